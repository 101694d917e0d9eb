//! MQTT topic templates such as `plant/{site}/{line}/{device}/{metric}`.

/// A compiled template: literal segments must match exactly, `{name}` captures one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Capture(String),
}

impl Template {
    /// Compiles a template, explaining what is wrong with a bad one.
    pub fn parse(template: &str) -> Result<Self, String> {
        let mut segments = Vec::new();
        let mut names = Vec::new();
        for seg in template.split('/') {
            if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!(
                        "{template:?}: capture {seg:?} must be {{name}} with letters, digits or _"
                    ));
                }
                if names.contains(&name) {
                    return Err(format!("{template:?}: {{{name}}} appears twice"));
                }
                names.push(name);
                segments.push(Segment::Capture(name.to_owned()));
            } else if seg.contains(['{', '}', '+', '#']) {
                return Err(format!(
                    "{template:?}: segment {seg:?} mixes text and braces or wildcards; \
                     a template segment is either literal text or one {{name}}"
                ));
            } else {
                segments.push(Segment::Literal(seg.to_owned()));
            }
        }
        Ok(Self { segments })
    }

    /// The captures of `topic`, in template order, if it matches.
    pub fn captures<'t>(&self, topic: &'t str) -> Option<Vec<(&str, &'t str)>> {
        let mut out = Vec::new();
        let mut parts = topic.split('/');
        for seg in &self.segments {
            let part = parts.next()?;
            match seg {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return None,
                Segment::Capture(_) if part.is_empty() => return None,
                Segment::Capture(name) => out.push((name.as_str(), part)),
            }
        }
        parts.next().is_none().then_some(out)
    }

    /// Whether the template captures `name`.
    pub fn has(&self, name: &str) -> bool {
        self.segments
            .iter()
            .any(|s| matches!(s, Segment::Capture(n) if n == name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_named_segments() {
        let t = Template::parse("plant/{site}/{line}/{device}/{metric}").unwrap();
        let c = t.captures("plant/p1/l3/press01/temperature").unwrap();
        assert_eq!(
            c,
            vec![
                ("site", "p1"),
                ("line", "l3"),
                ("device", "press01"),
                ("metric", "temperature")
            ]
        );
        assert!(t.captures("plant/p1/l3/press01").is_none());
        assert!(t.captures("plant/p1/l3/press01/t/extra").is_none());
        assert!(t.captures("other/p1/l3/press01/t").is_none());
        assert!(t.captures("plant/p1//press01/t").is_none());
        assert!(t.has("metric") && !t.has("tenant"));
    }

    #[test]
    fn bad_templates_explain_themselves() {
        assert!(Template::parse("plant/{}").unwrap_err().contains("capture"));
        assert!(Template::parse("a/{d}/{d}").unwrap_err().contains("twice"));
        assert!(Template::parse("a/x{d}").unwrap_err().contains("mixes"));
        assert!(Template::parse("a/+").is_err());
    }
}
