//! Splits a Kubernetes list response into its items while it streams in, so that a list of
//! 50,000 objects is decoded one object at a time and the whole body is never held: the
//! response `{"kind": "ServiceList", "metadata": {...}, "items": [{...}, {...}]}` arrives in
//! chunks, and each complete item is handed over as soon as its closing brace is seen.
//!
//! Only the structure is scanned (strings, escapes, nesting); the items themselves are
//! decoded by the caller. The list's own `metadata` (its resourceVersion) is kept whole.

/// Incremental scanner over one list response body.
#[derive(Debug, Default)]
pub struct ListSplitter {
    /// Bytes not yet consumed: from the start of whatever is being collected.
    buf: Vec<u8>,
    /// Next byte of `buf` to scan.
    pos: usize,
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// At depth 1, the next string is a key (after `{` or `,`).
    expect_key: bool,
    /// Start of the key string being read at depth 1.
    key_start: Option<usize>,
    last_key: Vec<u8>,
    in_items: bool,
    item_start: Option<usize>,
    metadata_start: Option<usize>,
    metadata: Option<Vec<u8>>,
    items: usize,
}

/// The response did not have the shape of a list.
#[derive(Debug, thiserror::Error)]
#[error("malformed list response: {0}")]
pub struct MalformedList(pub &'static str);

impl ListSplitter {
    pub fn new() -> Self {
        ListSplitter::default()
    }

    /// Scans `chunk`, calling `item` with the bytes of every item completed in it.
    pub fn feed(&mut self, chunk: &[u8], mut item: impl FnMut(&[u8])) -> Result<(), MalformedList> {
        self.buf.extend_from_slice(chunk);
        while self.pos < self.buf.len() {
            let byte = self.buf[self.pos];
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if byte == b'\\' {
                    self.escaped = true;
                } else if byte == b'"' {
                    self.in_string = false;
                    if let Some(start) = self.key_start.take() {
                        self.last_key = self.buf[start + 1..self.pos].to_vec();
                        self.expect_key = false;
                    }
                }
                self.pos += 1;
                continue;
            }
            match byte {
                b'"' => {
                    self.in_string = true;
                    if self.depth == 1 && self.expect_key {
                        self.key_start = Some(self.pos);
                    }
                }
                b'{' | b'[' => {
                    if self.depth == 0 && byte != b'{' {
                        return Err(MalformedList("the body is not a JSON object"));
                    }
                    if self.depth == 1 {
                        match (self.last_key.as_slice(), byte) {
                            (b"items", b'[') => self.in_items = true,
                            (b"metadata", b'{') => self.metadata_start = Some(self.pos),
                            _ => {}
                        }
                    } else if self.depth == 2 && self.in_items {
                        self.item_start = Some(self.pos);
                    }
                    self.depth += 1;
                    if self.depth == 1 {
                        self.expect_key = true;
                    }
                }
                b'}' | b']' => {
                    if self.depth == 0 {
                        return Err(MalformedList("unbalanced brackets"));
                    }
                    self.depth -= 1;
                    match self.depth {
                        2 if self.in_items => {
                            if let Some(start) = self.item_start.take() {
                                item(&self.buf[start..=self.pos]);
                                self.items += 1;
                            }
                        }
                        1 => {
                            self.in_items = false;
                            if let Some(start) = self.metadata_start.take() {
                                self.metadata = Some(self.buf[start..=self.pos].to_vec());
                            }
                        }
                        _ => {}
                    }
                }
                b',' if self.depth == 1 => self.expect_key = true,
                _ => {}
            }
            self.pos += 1;
        }
        self.compact();
        Ok(())
    }

    /// Drops the bytes nothing refers to any more.
    fn compact(&mut self) {
        let keep_from = [self.item_start, self.metadata_start, self.key_start]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(self.pos);
        if keep_from == 0 {
            return;
        }
        self.buf.drain(..keep_from);
        self.pos -= keep_from;
        for index in [
            &mut self.item_start,
            &mut self.metadata_start,
            &mut self.key_start,
        ]
        .into_iter()
        .flatten()
        {
            *index -= keep_from;
        }
    }

    /// Ends the body: checks that the object was complete and returns the list's
    /// `metadata.resourceVersion` (empty if it had none) and the number of items.
    pub fn finish(self) -> Result<(String, usize), MalformedList> {
        if self.depth != 0 || self.in_string {
            return Err(MalformedList("the body ended inside the object"));
        }
        #[derive(serde::Deserialize)]
        struct ListMeta {
            #[serde(default, rename = "resourceVersion")]
            resource_version: String,
        }
        let version = match &self.metadata {
            Some(bytes) => {
                serde_json::from_slice::<ListMeta>(bytes)
                    .map_err(|_| MalformedList("metadata is not an object"))?
                    .resource_version
            }
            None => String::new(),
        };
        Ok((version, self.items))
    }

    /// Bytes currently held (for tests: the body is never accumulated).
    pub fn held(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(body: &str, chunk: usize) -> (Vec<String>, String) {
        let mut splitter = ListSplitter::new();
        let mut items = Vec::new();
        for part in body.as_bytes().chunks(chunk) {
            splitter
                .feed(part, |item| {
                    items.push(String::from_utf8(item.to_vec()).unwrap())
                })
                .unwrap();
        }
        let (version, count) = splitter.finish().unwrap();
        assert_eq!(count, items.len());
        (items, version)
    }

    const BODY: &str = r#"{"kind":"ServiceList","apiVersion":"v1","metadata":{"resourceVersion":"4711","continue":""},
        "items":[{"metadata":{"name":"a","annotations":{"x":"}]{[\"items\":"}},"spec":{"ports":[{"port":80}]}},
                 {"metadata":{"name":"b"}} , {"metadata":{"name":"c\\"}}]}"#;

    #[test]
    fn items_and_version_whatever_the_chunking() {
        for chunk in [1, 2, 3, 7, 64, 4096] {
            let (items, version) = split(BODY, chunk);
            assert_eq!(version, "4711", "chunk {chunk}");
            assert_eq!(items.len(), 3, "chunk {chunk}");
            let names: Vec<String> = items
                .iter()
                .map(|i| {
                    let v: serde_json::Value = serde_json::from_str(i).unwrap();
                    v["metadata"]["name"].as_str().unwrap().to_string()
                })
                .collect();
            assert_eq!(names, ["a", "b", "c\\"], "chunk {chunk}");
        }
    }

    #[test]
    fn metadata_after_items_and_empty_lists() {
        let (items, version) = split(
            r#"{"items":[{"a":1}],"kind":"X","metadata":{"resourceVersion":"9"}}"#,
            5,
        );
        assert_eq!((items.len(), version.as_str()), (1, "9"));
        assert_eq!(
            split(r#"{"items":null,"metadata":{}}"#, 3),
            (vec![], String::new())
        );
        assert_eq!(
            split(r#"{"metadata":{"resourceVersion":"1"},"items":[]}"#, 4),
            (vec![], "1".to_string())
        );
    }

    #[test]
    fn holds_only_the_item_in_progress() {
        let item = format!(r#"{{"metadata":{{"name":"{}"}}}}"#, "x".repeat(100));
        let body = format!(
            r#"{{"metadata":{{"resourceVersion":"1"}},"items":[{}]}}"#,
            vec![item.as_str(); 1000].join(",")
        );
        let mut splitter = ListSplitter::new();
        let mut most = 0;
        let mut count = 0;
        for part in body.as_bytes().chunks(50) {
            splitter.feed(part, |_| count += 1).unwrap();
            most = most.max(splitter.held());
        }
        assert_eq!(count, 1000);
        assert!(most < 2 * item.len(), "held {most} bytes");
    }

    #[test]
    fn truncated_or_wrong_bodies_are_errors() {
        let mut splitter = ListSplitter::new();
        splitter.feed(br#"{"items":[{"a":1}"#, |_| {}).unwrap();
        assert!(splitter.finish().is_err());
        assert!(ListSplitter::new().feed(b"[1,2]", |_| {}).is_err());
        assert!(ListSplitter::new().feed(b"{}}", |_| {}).is_err());
    }
}
