//! An nft transaction as text, one command per line, remembering which service port each line
//! was written for, so that a failed transaction can name the object that caused it. While
//! every line is an element command of a plain set or map, the commands are also kept as data,
//! so a runner may send them as a netlink batch instead of text (see `netlink`).

use std::sync::Arc;

use kube_proxy_model::ServicePortName;

use crate::elements::{write_element, Key, SetName, Value};
use crate::netlink;
use crate::skeleton::TABLE;

/// `add element`/`delete element` of one set, as data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElementCommand {
    pub delete: bool,
    pub set: SetName,
    pub elements: Vec<(Key, Value)>,
}

#[derive(Debug)]
pub struct Transaction {
    text: String,
    lines: usize,
    /// (first line, owner) runs: lines from `first` on belong to `owner` until the next run.
    owners: Vec<(usize, Option<Arc<ServicePortName>>)>,
    /// Line `i + 1` as data, while every line is an encodable element command.
    elements: Option<Vec<ElementCommand>>,
}

impl Default for Transaction {
    fn default() -> Self {
        Transaction {
            text: String::new(),
            lines: 0,
            owners: Vec::new(),
            elements: Some(Vec::new()),
        }
    }
}

impl Transaction {
    pub fn new() -> Self {
        Transaction::default()
    }

    /// Appends one command. `owner` is the service port it was written for, if any.
    pub fn line(&mut self, owner: Option<&Arc<ServicePortName>>, command: impl AsRef<str>) {
        self.elements = None;
        self.push_line(owner, command.as_ref());
    }

    /// Appends `add element`/`delete element` for `command` (nothing if it has no elements).
    pub fn element_command(
        &mut self,
        fam: &str,
        owner: Option<&Arc<ServicePortName>>,
        command: ElementCommand,
    ) {
        if command.elements.is_empty() {
            return;
        }
        let verb = if command.delete { "delete" } else { "add" };
        let mut text = format!("{verb} element {fam} {TABLE} {} {{ ", command.set.name());
        for (i, (key, value)) in command.elements.iter().enumerate() {
            if i > 0 {
                text.push_str(", ");
            }
            if command.delete {
                text.push_str(&key.to_string());
            } else {
                write_element(&mut text, key, value);
            }
        }
        text.push_str(" }");
        self.push_line(owner, &text);
        if !netlink::encodable(command.set) {
            self.elements = None;
        }
        if let Some(elements) = self.elements.as_mut() {
            elements.push(command);
        }
    }

    /// Every line as an element command, when the whole transaction is made of them.
    pub fn element_commands(&self) -> Option<&[ElementCommand]> {
        self.elements.as_deref()
    }

    fn push_line(&mut self, owner: Option<&Arc<ServicePortName>>, command: &str) {
        self.lines += 1;
        let changed = match self.owners.last() {
            None => true,
            Some((_, last)) => last.as_ref().map(|a| a.as_ref()) != owner.map(|a| a.as_ref()),
        };
        if changed {
            self.owners.push((self.lines, owner.cloned()));
        }
        self.text.push_str(command);
        self.text.push('\n');
    }

    /// Appends every line of `other`, keeping their owners (and their data form).
    pub fn append(&mut self, other: Transaction) {
        match (self.elements.as_mut(), other.elements) {
            (Some(mine), Some(theirs)) => mine.extend(theirs),
            _ => self.elements = None,
        }
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
            self.push_line(owner, text);
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
    fn element_commands_keep_their_data_form_until_a_text_line() {
        let key = Key::Frontend("198.19.0.1".parse().unwrap(), Protocol::Tcp, 80);
        let value = Value::Endpoint("198.18.0.2".parse().unwrap(), 8080);
        let mut a = Transaction::new();
        a.element_command(
            "ip",
            None,
            ElementCommand {
                delete: true,
                set: SetName::Backends(0),
                elements: vec![(key.clone(), value.clone())],
            },
        );
        let mut b = Transaction::new();
        b.element_command(
            "ip",
            None,
            ElementCommand {
                delete: false,
                set: SetName::Backends(0),
                elements: vec![(key.clone(), value.clone())],
            },
        );
        a.append(b);
        assert_eq!(
            a.text(),
            "delete element ip kube-proxy backends-0 { 198.19.0.1 . tcp . 80 }\n\
             add element ip kube-proxy backends-0 { 198.19.0.1 . tcp . 80 : 198.18.0.2 . 8080 }\n"
        );
        assert_eq!(a.element_commands().map(|c| c.len()), Some(2));
        // An interval set has no data form here; nor has anything after a text line.
        let mut interval = Transaction::new();
        interval.element_command(
            "ip",
            None,
            ElementCommand {
                delete: false,
                set: SetName::FirewallAllow,
                elements: vec![(key.clone(), Value::None)],
            },
        );
        assert_eq!(interval.element_commands(), None);
        a.line(None, "flush chain ip kube-proxy services");
        assert_eq!(a.element_commands(), None);
    }

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
        assert_eq!(tx.element_commands(), None, "text lines have no data form");
        let explained = tx.explain(
            "/dev/stdin:3:38-45: Error: Could not process rule: No such file or directory",
        );
        assert!(
            explained.contains("line 3 (written for service port ns/a:p)"),
            "{explained}"
        );
    }
}
