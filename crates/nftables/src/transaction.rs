//! An nft transaction as text, one command per line, remembering which service port each line
//! was written for, so that a failed transaction can name the object that caused it.

use std::sync::Arc;

use kube_proxy_model::ServicePortName;

#[derive(Debug, Default)]
pub struct Transaction {
    text: String,
    lines: usize,
    /// (first line, owner) runs: lines from `first` on belong to `owner` until the next run.
    owners: Vec<(usize, Option<Arc<ServicePortName>>)>,
}

impl Transaction {
    pub fn new() -> Self {
        Transaction::default()
    }

    /// Appends one command. `owner` is the service port it was written for, if any.
    pub fn line(&mut self, owner: Option<&Arc<ServicePortName>>, command: impl AsRef<str>) {
        self.lines += 1;
        let changed = match self.owners.last() {
            None => true,
            Some((_, last)) => last.as_ref().map(|a| a.as_ref()) != owner.map(|a| a.as_ref()),
        };
        if changed {
            self.owners.push((self.lines, owner.cloned()));
        }
        self.text.push_str(command.as_ref());
        self.text.push('\n');
    }

    /// Appends every line of `other`, keeping their owners.
    pub fn append(&mut self, other: Transaction) {
        let mut runs = other.owners.iter().peekable();
        let mut owner: Option<&Arc<ServicePortName>> = None;
        for (index, text) in other.text.lines().enumerate() {
            let line = index + 1;
            while let Some((first, run_owner)) = runs.peek() {
                if *first > line {
                    break;
                }
                owner = run_owner.as_ref();
                runs.next();
            }
            self.line(owner, text);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.lines == 0
    }
    pub fn len(&self) -> usize {
        self.lines
    }
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The service port that line `line` (1-based, as nft reports it) was written for.
    pub fn owner_of_line(&self, line: usize) -> Option<&ServicePortName> {
        let index = self.owners.partition_point(|(first, _)| *first <= line);
        index
            .checked_sub(1)
            .and_then(|i| self.owners[i].1.as_deref())
    }

    /// The text of line `line` (1-based).
    pub fn line_text(&self, line: usize) -> Option<&str> {
        self.text.lines().nth(line.checked_sub(1)?)
    }

    /// Explains an nft error: the first `<input>:LINE:` it mentions, that line, and its owner.
    pub fn explain(&self, stderr: &str) -> String {
        let line = stderr.lines().find_map(|l| {
            let mut parts = l.split(':');
            parts.next()?;
            parts.next()?.trim().parse::<usize>().ok()
        });
        match line {
            Some(line) => {
                let owner = self
                    .owner_of_line(line)
                    .map(|o| format!(" (written for service port {o})"))
                    .unwrap_or_default();
                let text = self.line_text(line).unwrap_or("");
                format!("line {line}{owner}: {text:?}: {}", stderr.trim())
            }
            None => stderr.trim().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_proxy_model::{NamespacedName, Protocol};

    #[test]
    fn owners_by_line() {
        let a = Arc::new(ServicePortName {
            service: NamespacedName::new("ns", "a"),
            port: "p".into(),
            protocol: Protocol::Tcp,
        });
        let mut tx = Transaction::new();
        tx.line(None, "add table ip kube-proxy");
        tx.line(
            Some(&a),
            "add element ip kube-proxy cluster-ips { 198.19.0.1 }",
        );
        tx.line(
            Some(&a),
            "add element ip kube-proxy dnat-1 { 198.19.0.1 . tcp . 80 }",
        );
        tx.line(None, "flush chain ip kube-proxy services");
        assert_eq!(tx.owner_of_line(1), None);
        assert_eq!(
            tx.owner_of_line(3).map(|o| o.to_string()).as_deref(),
            Some("ns/a:p")
        );
        assert_eq!(tx.owner_of_line(4), None);
        let explained = tx.explain(
            "/dev/stdin:3:38-45: Error: Could not process rule: No such file or directory",
        );
        assert!(
            explained.contains("line 3 (written for service port ns/a:p)"),
            "{explained}"
        );
    }
}
