//! MQTT topic templates such as `plant/{site}/{line}/{device}/{metric}`, and the device ids
//! composed from their captures ([`device`]).

pub mod device;

pub use device::DeviceFormat;

/// Longest device id or metric name, in bytes. The decoder refuses longer ones.
pub const MAX_NAME: usize = 128;

/// A compiled `[[mqtt.topics]]` entry: literal segments must match exactly, `{name}`
/// captures one segment, and an optional [`DeviceFormat`] composes the device id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    segments: Vec<Segment>,
    device: Option<DeviceFormat>,
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
        Ok(Self {
            source: template.to_owned(),
            segments,
            device: None,
        })
    }

    /// Composes the device id with `format` (`device = "{line}-{device}"`), explaining what
    /// is wrong with a bad one.
    pub fn with_device(mut self, format: &str) -> Result<Self, String> {
        self.device = Some(DeviceFormat::parse(format, &self)?);
        Ok(self)
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The device format, if the entry has one.
    pub fn device_format(&self) -> Option<&DeviceFormat> {
        self.device.as_ref()
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

    /// The device id composed by the entry's [`DeviceFormat`] from `captures` (as
    /// [`Template::captures`] returns them); `None` without a format.
    pub fn device_id(&self, captures: &[(&str, &str)]) -> Option<String> {
        self.device.as_ref().map(|f| f.render(captures))
    }

    /// Whether the template captures `name`.
    pub fn has(&self, name: &str) -> bool {
        self.names().any(|n| n == name)
    }

    /// The capture names, in template order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Capture(n) => Some(n.as_str()),
            Segment::Literal(_) => None,
        })
    }

    /// A topic this template matches, each capture replaced by its name and `1`:
    /// `plant/{site}/{device}` gives `plant/site1/device1`.
    pub fn example(&self) -> String {
        let parts: Vec<String> = self
            .segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.clone(),
                Segment::Capture(n) => format!("{n}1"),
            })
            .collect();
        parts.join("/")
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
        assert_eq!(
            t.device_id(&c),
            None,
            "no format: the {{device}} capture is the id"
        );
    }

    #[test]
    fn a_device_format_composes_the_id_from_captures() {
        let t = Template::parse("plant/{site}/{line}/{device}/{metric}")
            .unwrap()
            .with_device("{line}-{device}")
            .unwrap();
        let c = t.captures("plant/p1/l3/press01/temperature").unwrap();
        assert_eq!(t.device_id(&c).as_deref(), Some("l3-press01"));
        let c = t.captures("plant/p1/l4/press01/temperature").unwrap();
        assert_eq!(t.device_id(&c).as_deref(), Some("l4-press01"));
    }

    #[test]
    fn examples_are_matched_by_their_template() {
        for src in [
            "plant/{site}/{line}/{device}/{metric}",
            "fixed/{device}",
            "a/b",
        ] {
            let t = Template::parse(src).unwrap();
            let ex = t.example();
            assert!(t.captures(&ex).is_some(), "{src}: {ex}");
        }
        let t = Template::parse("plant/{site}/{device}").unwrap();
        assert_eq!(t.example(), "plant/site1/device1");
        assert_eq!(t.names().collect::<Vec<_>>(), vec!["site", "device"]);
        assert_eq!(t.as_str(), "plant/{site}/{device}");
    }

    #[test]
    fn bad_templates_explain_themselves() {
        assert!(Template::parse("plant/{}").unwrap_err().contains("capture"));
        assert!(Template::parse("a/{d}/{d}").unwrap_err().contains("twice"));
        assert!(Template::parse("a/x{d}").unwrap_err().contains("mixes"));
        assert!(Template::parse("a/+").is_err());
    }
}
