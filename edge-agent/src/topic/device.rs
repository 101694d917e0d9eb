//! Device ids composed from topic captures: `device = "{line}-{device}"` in `[[mqtt.topics]]`.
//!
//! With `plant/{site}/{line}/{device}/{metric}` alone, the `{device}` segment is the whole
//! device id, so `press01` on line 3 and `press01` on line 4 are one device: a reading's
//! identity is (tenant, device, metric, ts), and two such readings stamped alike collide. A
//! format names the device by several captures instead. It only composes the id; every
//! capture still does what it did (`line` stays a tag).
//!
//! A format is literal text and `{name}` placeholders, each naming a capture of its template.
//! Braces are never text. [`DeviceFormat::parse`] checks all of that when the config is
//! loaded, so composing an id ([`DeviceFormat::render`]) cannot fail.

use super::{MAX_NAME, Template};

/// A compiled `device = "..."` format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFormat {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Capture(String),
}

const BRACES: &str = "a placeholder is {name}, and braces cannot be part of the text";

impl DeviceFormat {
    /// Compiles `format` against the captures of `template`, explaining what is wrong with
    /// a bad one and what to write instead.
    pub fn parse(format: &str, template: &Template) -> Result<Self, String> {
        if format.is_empty() {
            return Err(
                "\"\" is empty; write e.g. \"{line}-{device}\", or remove the key to use the \
                 {device} capture as the id"
                    .into(),
            );
        }
        let mut parts = Vec::new();
        let mut rest = format;
        while let Some(open) = rest.find(['{', '}']) {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            if rest[open..].starts_with('}') {
                return Err(format!(
                    "{format:?}: \"}}\" after {:?} closes no placeholder; {BRACES}",
                    &format[..format.len() - rest.len() + open]
                ));
            }
            let after = &rest[open + 1..];
            let name = match after.find(['{', '}']) {
                Some(close) if after[close..].starts_with('}') => &after[..close],
                other => {
                    let upto = other.map_or(rest.len(), |c| open + 1 + c);
                    return Err(format!(
                        "{format:?}: {:?} opens a placeholder that is not closed by \"}}\"; \
                         {BRACES}",
                        &rest[open..upto]
                    ));
                }
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "{format:?}: placeholder {{{name}}} must be {{name}} with letters, digits \
                     or _, naming a capture of the template"
                ));
            }
            if !template.has(name) {
                let known: Vec<String> = template.names().map(|n| format!("{{{n}}}")).collect();
                let known = if known.is_empty() {
                    "it captures nothing".to_owned()
                } else {
                    format!("use one of {}", known.join(", "))
                };
                return Err(format!(
                    "{format:?}: {{{name}}} is not a capture of template {:?}; {known}, or add \
                     {{{name}}} to the template",
                    template.as_str()
                ));
            }
            parts.push(Part::Capture(name.to_owned()));
            rest = &after[name.len() + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        let uses = |n: &str| {
            parts
                .iter()
                .any(|p| matches!(p, Part::Capture(c) if c == n))
        };
        if template.has("device") && !uses("device") {
            return Err(format!(
                "{format:?} leaves out {{device}}, so the devices that template {:?} tells \
                 apart would share one id; include {{device}}, e.g. \"{{line}}-{{device}}\" \
                 (or rename the capture if that segment is not the device)",
                template.as_str()
            ));
        }
        if format.chars().any(char::is_control) {
            return Err(format!(
                "{format:?}: control characters cannot be part of a device id"
            ));
        }
        let f = Self {
            source: format.to_owned(),
            parts,
        };
        if f.min_len() > MAX_NAME {
            return Err(format!(
                "{format:?} makes ids of at least {} bytes; a device id is at most {MAX_NAME}, so \
                 shorten the text between the placeholders",
                f.min_len()
            ));
        }
        Ok(f)
    }

    /// The format as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The shortest id it can make: its text, and one byte per placeholder (a topic segment
    /// is never empty).
    fn min_len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.len(),
                Part::Capture(_) => 1,
            })
            .sum()
    }

    /// The id for `captures` (as [`Template::captures`] returns them for the template this
    /// format was parsed with).
    pub fn render(&self, captures: &[(&str, &str)]) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Capture(name) => {
                    if let Some((_, v)) = captures.iter().find(|(n, _)| n == name) {
                        out.push_str(v);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(t: &str) -> Template {
        Template::parse(t).unwrap()
    }

    fn plant() -> Template {
        template("plant/{site}/{line}/{device}/{metric}")
    }

    fn render(t: &Template, format: &str, topic: &str) -> String {
        let f = DeviceFormat::parse(format, t).unwrap();
        f.render(&t.captures(topic).unwrap())
    }

    #[test]
    fn placeholders_take_captures_and_text_stays() {
        let t = plant();
        let topic = "plant/p1/l3/press01/temperature";
        assert_eq!(render(&t, "{line}-{device}", topic), "l3-press01");
        assert_eq!(render(&t, "{site}/{line}/{device}", topic), "p1/l3/press01");
        assert_eq!(
            render(&t, "line {line}: {device}!", topic),
            "line l3: press01!"
        );
        assert_eq!(
            render(&t, "{device}{line}{device}", topic),
            "press01l3press01"
        );
        assert_eq!(render(&t, "{device}", topic), "press01");
    }

    #[test]
    fn without_a_device_capture_any_captures_compose_the_id() {
        let t = template("plant/{site}/{line}/{unit}/{metric}");
        let topic = "plant/p1/l3/u7/flow";
        assert_eq!(render(&t, "{site}-{line}-{unit}", topic), "p1-l3-u7");
        // A topic tree that belongs to one device may name it outright.
        let t = template("boiler/{metric}");
        assert_eq!(render(&t, "boiler-1", "boiler/flow"), "boiler-1");
    }

    #[test]
    fn placeholders_must_be_captures_of_the_template() {
        let e = DeviceFormat::parse("{line}-{dev}", &plant()).unwrap_err();
        assert!(e.contains("{dev} is not a capture"), "{e}");
        assert!(e.contains("{site}, {line}, {device}, {metric}"), "{e}");
        let e = DeviceFormat::parse("{x}", &template("a/b")).unwrap_err();
        assert!(e.contains("captures nothing"), "{e}");
    }

    #[test]
    fn braces_must_be_well_formed() {
        for (bad, says) in [
            ("{line-{device}", "\"{line-\" opens a placeholder"),
            ("{line}-{device", "\"{device\" opens a placeholder"),
            (
                "line}-{device}",
                "\"}\" after \"line\" closes no placeholder",
            ),
            ("{line}}{device}", "after \"{line}\" closes no placeholder"),
            ("{}-{device}", "placeholder {} must be"),
            ("{li ne}-{device}", "placeholder {li ne} must be"),
        ] {
            let e = DeviceFormat::parse(bad, &plant()).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(
                e.starts_with(&format!("{bad:?}")),
                "{bad}: names the value: {e}"
            );
        }
    }

    #[test]
    fn formats_that_cannot_make_a_good_id_are_refused() {
        let t = plant();
        let e = DeviceFormat::parse("", &t).unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e = DeviceFormat::parse("{site}-{line}", &t).unwrap_err();
        assert!(e.contains("leaves out {device}"), "{e}");
        let e = DeviceFormat::parse("press01", &t).unwrap_err();
        assert!(e.contains("leaves out {device}"), "{e}");
        let e = DeviceFormat::parse("{line}\t{device}", &t).unwrap_err();
        assert!(e.contains("control characters"), "{e}");
        let long = format!("{}-{{device}}", "x".repeat(MAX_NAME - 1));
        let e = DeviceFormat::parse(&long, &t).unwrap_err();
        assert!(
            e.contains(&format!("at least {} bytes", MAX_NAME + 1)),
            "{e}"
        );
        let fits = format!("{}{{device}}", "x".repeat(MAX_NAME - 1));
        assert!(DeviceFormat::parse(&fits, &t).is_ok());
    }
}
