//! LVM2's metadata text format ("Text Format Volume Group"), parsed into a tree: sections
//! `name { … }`, assignments `key = value`, values that are integers, strings or lists;
//! `#` comments. Sans-I/O; nesting and size are capped.

use crate::error::{Error, Result};

/// A value in the metadata text.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    Str(String),
    List(Vec<Value>),
    Section(Section),
}

/// A section: its entries in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Section(pub Vec<(String, Value)>);

impl Section {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    pub fn int(&self, key: &str) -> Option<i64> {
        match self.get(key) {
            Some(Value::Int(i)) => Some(*i),
            _ => None,
        }
    }
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }
    pub fn section(&self, key: &str) -> Option<&Section> {
        match self.get(key) {
            Some(Value::Section(s)) => Some(s),
            _ => None,
        }
    }
    pub fn list(&self, key: &str) -> Option<&[Value]> {
        match self.get(key) {
            Some(Value::List(l)) => Some(l),
            _ => None,
        }
    }
    /// The subsections, in order.
    pub fn sections(&self) -> impl Iterator<Item = (&str, &Section)> {
        self.0.iter().filter_map(|(k, v)| match v {
            Value::Section(s) => Some((k.as_str(), s)),
            _ => None,
        })
    }
}

const MAX_DEPTH: usize = 32;

struct Parser<'a> {
    b: &'a [u8],
    pos: usize,
}

fn bad(pos: usize, what: &str) -> Error {
    Error::corrupt("LVM metadata text", pos as u64, what.to_owned())
}

/// Parse a whole metadata text.
pub fn parse(text: &[u8]) -> Result<Section> {
    let mut p = Parser { b: text, pos: 0 };
    let s = p.entries(0)?;
    p.skip_space();
    if p.pos < p.b.len() && p.b[p.pos] != 0 {
        return Err(bad(p.pos, "unexpected `}`"));
    }
    Ok(s)
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied().filter(|&c| c != 0)
    }

    fn skip_space(&mut self) {
        while let Some(c) = self.peek() {
            if c == b'#' {
                while self.peek().is_some_and(|c| c != b'\n') {
                    self.pos += 1;
                }
            } else if c.is_ascii_whitespace() {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    fn ident(&mut self) -> Result<String> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || b"_.+-".contains(&c)) {
            self.pos += 1;
        }
        if start == self.pos {
            return Err(bad(self.pos, "expected a name"));
        }
        Ok(String::from_utf8_lossy(&self.b[start..self.pos]).into_owned())
    }

    /// Entries until `}` or the end.
    fn entries(&mut self, depth: usize) -> Result<Section> {
        if depth > MAX_DEPTH {
            return Err(bad(self.pos, "sections nested too deep"));
        }
        let mut out = Vec::new();
        loop {
            self.skip_space();
            match self.peek() {
                None | Some(b'}') => return Ok(Section(out)),
                _ => {}
            }
            let key = self.ident()?;
            self.skip_space();
            match self.peek() {
                Some(b'{') => {
                    self.pos += 1;
                    let s = self.entries(depth + 1)?;
                    if self.peek() != Some(b'}') {
                        return Err(bad(self.pos, "missing `}`"));
                    }
                    self.pos += 1;
                    out.push((key, Value::Section(s)));
                }
                Some(b'=') => {
                    self.pos += 1;
                    self.skip_space();
                    out.push((key, self.value(depth)?));
                }
                _ => return Err(bad(self.pos, "expected `=` or `{`")),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value> {
        match self.peek() {
            Some(b'"') => self.string().map(Value::Str),
            Some(b'[') => {
                if depth > MAX_DEPTH {
                    return Err(bad(self.pos, "lists nested too deep"));
                }
                self.pos += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_space();
                    match self.peek() {
                        Some(b']') => {
                            self.pos += 1;
                            return Ok(Value::List(items));
                        }
                        Some(b',') => self.pos += 1,
                        None => return Err(bad(self.pos, "unterminated list")),
                        _ => items.push(self.value(depth + 1)?),
                    }
                }
            }
            Some(c) if c == b'-' || c.is_ascii_digit() => {
                let start = self.pos;
                self.pos += 1;
                while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    self.pos += 1;
                }
                let s = std::str::from_utf8(&self.b[start..self.pos]).map_err(|_| bad(start, "bad number"))?;
                s.parse().map(Value::Int).map_err(|_| bad(start, "number out of range"))
            }
            _ => Err(bad(self.pos, "expected a value")),
        }
    }

    fn string(&mut self) -> Result<String> {
        let start = self.pos;
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(bad(start, "unterminated string")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(String::from_utf8_lossy(&out).into_owned());
                }
                Some(b'\\') => {
                    self.pos += 1;
                    if let Some(c) = self.peek() {
                        out.push(c);
                        self.pos += 1;
                    }
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_shapes_lvm_writes() {
        let t = br#"# Generated by LVM2
vg0 {
	id = "abc-def"
	seqno = 3
	status = ["RESIZEABLE", "READ", "WRITE"]
	extent_size = 8192		# 4 Megabytes
	physical_volumes {
		pv0 {
			id = "x"
			pe_start = 2048
		}
	}
	logical_volumes {
		root {
			segment1 {
				stripes = [
					"pv0", 0,
					"pv1", -1
				]
				name = "a \"quoted\" word"
			}
		}
	}
}
contents = "Text Format Volume Group"
version = 1
"#;
        let s = parse(t).unwrap();
        let vg = s.section("vg0").unwrap();
        assert_eq!(vg.int("extent_size"), Some(8192));
        assert_eq!(vg.list("status").unwrap().len(), 3);
        assert_eq!(vg.section("physical_volumes").unwrap().section("pv0").unwrap().int("pe_start"), Some(2048));
        let seg = vg.section("logical_volumes").unwrap().section("root").unwrap().section("segment1").unwrap();
        assert_eq!(
            seg.list("stripes").unwrap(),
            &[Value::Str("pv0".into()), Value::Int(0), Value::Str("pv1".into()), Value::Int(-1)]
        );
        assert_eq!(seg.str("name"), Some("a \"quoted\" word"));
        assert_eq!(s.int("version"), Some(1));
    }

    #[test]
    fn malformed_text_is_an_error() {
        for t in [&b"a {"[..], b"a = ", b"a = \"x", b"a = [1, 2", b"}", b"= 1", b"a = 99999999999999999999"] {
            assert!(parse(t).is_err(), "{:?}", String::from_utf8_lossy(t));
        }
        let deep = "a {".repeat(100);
        assert!(parse(deep.as_bytes()).is_err());
        assert!(parse(b"").unwrap().0.is_empty());
    }
}
