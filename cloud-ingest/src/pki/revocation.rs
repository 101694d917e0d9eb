//! The revocation list: certificates refused although they are valid and from the fleet CA.
//!
//! A text file, one entry per line; `#` starts a comment, blank lines are ignored:
//!
//! ```text
//! # gw-plant1-01's certificate was stolen on 2025-03-02
//! serial:6f0c1d...      # the certificate's serial number, hex (colons and case ignored)
//! sha256:9b2e44...      # the SHA-256 fingerprint of its DER encoding, 64 hex digits
//! gateway:gw-old-07     # every certificate of that gateway id
//! ```
//!
//! Revoking by serial or fingerprint refuses one certificate, so the same gateway id can be
//! issued a new one. `cloud-ingest pki revoke` appends entries; `cloud-ingest run` reloads the
//! file on SIGHUP (and when it changes, see `quic.revocation_poll_secs`).

use std::collections::HashSet;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{GatewayIdentity, PkiError};

/// The file `cloud-ingest pki revoke --dir` writes, in the PKI folder.
pub const FILE_NAME: &str = "revoked.txt";

/// One revocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Entry {
    /// A certificate serial number: lowercase hex without leading zeros.
    Serial(String),
    /// A certificate's SHA-256 fingerprint: 64 lowercase hex digits.
    Fingerprint(String),
    /// Every certificate of a gateway id.
    Gateway(String),
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Serial(s) => write!(f, "serial:{s}"),
            Self::Fingerprint(s) => write!(f, "sha256:{s}"),
            Self::Gateway(s) => write!(f, "gateway:{s}"),
        }
    }
}

/// Strips separators (`:`, spaces) and an `0x` prefix, lowercases, and checks for hex digits.
fn hex(value: &str) -> Result<String, String> {
    let v = value.trim();
    let v = v
        .strip_prefix("0x")
        .or_else(|| v.strip_prefix("0X"))
        .unwrap_or(v);
    let h: String = v
        .chars()
        .filter(|c| !matches!(c, ':' | ' '))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if h.is_empty() {
        return Err("is empty".into());
    }
    if let Some(c) = h.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(format!("has {c:?}, not a hex digit"));
    }
    Ok(h)
}

impl Entry {
    /// A serial number in hex (`6F:0C:...` or `6f0c...`).
    pub fn serial(value: &str) -> Result<Self, String> {
        let h = hex(value).map_err(|e| format!("serial {e}"))?;
        let h = h.trim_start_matches('0');
        let h = if h.is_empty() { "0" } else { h };
        // RFC 5280: at most 20 octets.
        if h.len() > 40 {
            return Err(format!(
                "serial has {} hex digits; a certificate serial has at most 40",
                h.len()
            ));
        }
        Ok(Self::Serial(h.to_owned()))
    }

    /// A SHA-256 fingerprint in hex.
    pub fn fingerprint(value: &str) -> Result<Self, String> {
        let h = hex(value).map_err(|e| format!("fingerprint {e}"))?;
        if h.len() != 64 {
            return Err(format!(
                "a SHA-256 fingerprint has 64 hex digits, this one {}",
                h.len()
            ));
        }
        Ok(Self::Fingerprint(h))
    }

    /// A gateway id.
    pub fn gateway(value: &str) -> Result<Self, String> {
        let value = value.trim();
        // `<tenant>/<id>` names one tenant's gateway; a bare id, that id in every tenant.
        match value.split_once('/') {
            Some((tenant, id)) => {
                super::check_id("tenant", tenant).map_err(|e| e.to_string())?;
                super::check_id("gateway id", id).map_err(|e| e.to_string())?;
            }
            None => super::check_id("gateway id", value).map_err(|e| e.to_string())?,
        }
        Ok(Self::Gateway(value.to_owned()))
    }

    /// One line of the list, without its comment: `serial:HEX`, `sha256:HEX` or `gateway:ID`.
    pub fn parse(line: &str) -> Result<Self, String> {
        let Some((kind, value)) = line.trim().split_once(':') else {
            return Err(
                "expected serial:<hex>, sha256:<hex>, gateway:<tenant>/<id> or gateway:<id>".into(),
            );
        };
        match kind.trim().to_ascii_lowercase().as_str() {
            "serial" => Self::serial(value),
            "sha256" | "fingerprint" => Self::fingerprint(value),
            "gateway" => Self::gateway(value),
            other => Err(format!(
                "unknown kind {other:?}; expected serial:<hex>, sha256:<hex>, gateway:<tenant>/<id> or gateway:<id>"
            )),
        }
    }
}

/// A line of a revocation list that is not an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {why} (the line is {text:?})")]
pub struct LineError {
    /// 1-based.
    pub line: usize,
    /// The line as written.
    pub text: String,
    /// What is wrong.
    pub why: String,
}

/// Why a revocation list file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file cannot be read.
    #[error(
        "revocation list {path}: {source}; create it (an empty file revokes nothing) or fix quic.revocation_file"
    )]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not an entry.
    #[error("revocation list {path}: {error}")]
    Line {
        /// The file.
        path: PathBuf,
        /// The line at fault.
        error: LineError,
    },
}

/// Which entry refused a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// Its serial number.
    Serial,
    /// Its fingerprint.
    Fingerprint,
    /// Its gateway id.
    Gateway,
}

impl Match {
    /// The metric label and log field.
    pub fn label(self) -> &'static str {
        match self {
            Self::Serial => "serial",
            Self::Fingerprint => "fingerprint",
            Self::Gateway => "gateway",
        }
    }
}

/// The revoked serials, fingerprints and gateway ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationList {
    serials: HashSet<String>,
    fingerprints: HashSet<String>,
    gateways: HashSet<String>,
}

impl RevocationList {
    /// Parses the text of a list; the error names the first bad line.
    pub fn parse(text: &str) -> Result<Self, LineError> {
        let mut list = Self::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split_once('#').map_or(raw, |(l, _)| l).trim();
            if line.is_empty() {
                continue;
            }
            let entry = Entry::parse(line).map_err(|why| LineError {
                line: i + 1,
                text: raw.to_owned(),
                why,
            })?;
            list.insert(entry);
        }
        Ok(list)
    }

    /// Reads and parses a list file.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|error| LoadError::Line {
            path: path.to_owned(),
            error,
        })
    }

    /// Adds an entry; false if it was there already.
    pub fn insert(&mut self, entry: Entry) -> bool {
        match entry {
            Entry::Serial(s) => self.serials.insert(s),
            Entry::Fingerprint(s) => self.fingerprints.insert(s),
            Entry::Gateway(s) => self.gateways.insert(s),
        }
    }

    /// Whether the entry is in the list.
    pub fn contains(&self, entry: &Entry) -> bool {
        match entry {
            Entry::Serial(s) => self.serials.contains(s),
            Entry::Fingerprint(s) => self.fingerprints.contains(s),
            Entry::Gateway(s) => self.gateways.contains(s),
        }
    }

    /// Adds every entry of `other`.
    pub fn extend(&mut self, other: &Self) {
        self.serials.extend(other.serials.iter().cloned());
        self.fingerprints.extend(other.fingerprints.iter().cloned());
        self.gateways.extend(other.gateways.iter().cloned());
    }

    /// Whether the certificate of `id` is revoked, and by which entry.
    pub fn check(&self, id: &GatewayIdentity) -> Option<Match> {
        if self.serials.contains(&id.serial) {
            Some(Match::Serial)
        } else if self.fingerprints.contains(&id.fingerprint) {
            Some(Match::Fingerprint)
        } else if self.gateways.contains(&id.gateway)
            || self
                .gateways
                .contains(&format!("{}/{}", id.tenant, id.gateway))
        {
            Some(Match::Gateway)
        } else {
            None
        }
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.serials.len() + self.fingerprints.len() + self.gateways.len()
    }

    /// Whether nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The canonical serial of a certificate from its DER integer bytes.
pub fn serial_hex(raw: &[u8]) -> String {
    let s: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    match s.trim_start_matches('0') {
        "" => "0".into(),
        t => t.to_owned(),
    }
}

/// The SHA-256 fingerprint of a certificate's DER encoding, lowercase hex.
pub fn sha256_hex(der: &[u8]) -> String {
    // The SHA-256 of the ring provider rustls already carries.
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let Some(s) = suite.tls13() else {
        unreachable!("TLS13_AES_128_GCM_SHA256 is a TLS 1.3 suite")
    };
    s.common
        .hash_provider
        .hash(der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Appends `entries` to the list at `path` (created if missing), each after the comment
/// line `# <note>`. Refuses a list that does not parse (it would not be loaded either).
/// Returns the entries written: those already in the list are left out.
pub fn append(path: &Path, entries: &[Entry], note: &str) -> Result<Vec<Entry>, PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let existing = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(e)),
    };
    let list = RevocationList::parse(&existing).map_err(|e| PkiError::BadList {
        path: path.to_owned(),
        error: e,
    })?;
    let new: Vec<Entry> = entries
        .iter()
        .filter(|e| !list.contains(e))
        .cloned()
        .collect();
    if new.is_empty() {
        return Ok(new);
    }
    let mut text = String::new();
    if !existing.is_empty() && !existing.ends_with('\n') {
        text.push('\n');
    }
    let note = note.replace(['\n', '\r'], " ");
    text.push_str(&format!("# {note}\n"));
    for e in &new {
        text.push_str(&format!("{e}\n"));
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(gateway: &str, serial: &str, fingerprint: &str) -> GatewayIdentity {
        GatewayIdentity {
            tenant: "acme".into(),
            gateway: gateway.into(),
            serial: serial.into(),
            fingerprint: fingerprint.into(),
        }
    }

    const FP: &str = "9b2e44aa00112233445566778899aabbccddeeff00112233445566778899aabb";

    #[test]
    fn good_lines_and_comments_parse() {
        let text = format!(
            "# stolen 2025-03-02\n\n  serial:00:6F:0c:1D   # with colons, case and a zero\n\
             sha256:{}\nSHA256 : {FP}\ngateway:gw-old-07\nfingerprint:{FP}\n   # only a comment\n\
             serial:0x0abc\n",
            FP.to_uppercase()
        );
        let l = RevocationList::parse(&text).unwrap();
        assert_eq!(l.len(), 4, "{l:?}");
        assert!(l.contains(&Entry::Serial("6f0c1d".into())));
        assert!(l.contains(&Entry::Serial("abc".into())));
        assert!(l.contains(&Entry::Fingerprint(FP.into())));
        assert!(l.contains(&Entry::Gateway("gw-old-07".into())));
        assert!(RevocationList::parse("").unwrap().is_empty());
        assert!(RevocationList::parse("# nothing\n\n").unwrap().is_empty());
        // What a list says is what it writes.
        for e in [
            Entry::serial("00ff").unwrap(),
            Entry::fingerprint(FP).unwrap(),
            Entry::gateway("gw-1").unwrap(),
        ] {
            assert_eq!(Entry::parse(&e.to_string()).unwrap(), e);
        }
        assert_eq!(Entry::serial("0000").unwrap(), Entry::Serial("0".into()));
    }

    #[test]
    fn bad_lines_are_named() {
        let cases = [
            ("gw-1\n", 1, "expected serial:<hex>"),
            (
                "# ok\nserial:12\nserial:xyz\n",
                3,
                "serial has 'x', not a hex digit",
            ),
            ("\n\nsha256:abcd\n", 3, "64 hex digits, this one 4"),
            ("gateway:../etc\n", 1, "tenant \"..\""),
            ("gateway:gw 1\n", 1, "\"gw 1\""),
            ("serial:\n", 1, "serial is empty"),
            ("crl:1234\n", 1, "unknown kind \"crl\""),
            (&format!("serial:{}\n", "1".repeat(41)), 1, "at most 40"),
        ];
        for (text, line, why) in cases {
            let e = RevocationList::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(why), "{text:?}: {e}");
            assert!(e.to_string().starts_with(&format!("line {line}: ")), "{e}");
        }
    }

    #[test]
    fn certificates_match_by_serial_fingerprint_or_gateway_id() {
        let l =
            RevocationList::parse(&format!("serial:6f0c\nsha256:{FP}\ngateway:gw-old\n")).unwrap();
        assert_eq!(l.check(&id("gw-1", "6f0c", "00")), Some(Match::Serial));
        assert_eq!(l.check(&id("gw-1", "6f0d", FP)), Some(Match::Fingerprint));
        assert_eq!(l.check(&id("gw-old", "1", "00")), Some(Match::Gateway));
        // The same gateway id with another certificate is not revoked.
        assert_eq!(l.check(&id("gw-1", "6f0d", "00")), None);
        // `<tenant>/<id>` revokes one tenant's gateway only.
        let scoped = RevocationList::parse("gateway:beta/gw-9\n").unwrap();
        let mut beta = id("gw-9", "01", "02");
        assert_eq!(scoped.check(&beta), None, "acme's gw-9 is not beta's");
        beta.tenant = "beta".into();
        assert_eq!(scoped.check(&beta), Some(Match::Gateway));
        assert!(RevocationList::parse("gateway:beta/\n").is_err());
        assert_eq!(
            [Match::Serial, Match::Fingerprint, Match::Gateway].map(Match::label),
            ["serial", "fingerprint", "gateway"]
        );
        assert_eq!(serial_hex(&[0x00, 0x6f, 0x0c]), "6f0c");
        assert_eq!(serial_hex(&[0x00]), "0");
        assert_eq!(serial_hex(&[0x10, 0x00]), "1000");
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn append_writes_new_entries_once_and_refuses_a_broken_list() {
        let dir = std::env::temp_dir().join(format!("plantlink-revoke-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE_NAME);
        let s = Entry::serial("AB:CD").unwrap();
        let g = Entry::gateway("gw-1").unwrap();
        let written = append(&path, std::slice::from_ref(&s), "first").unwrap();
        assert_eq!(written, std::slice::from_ref(&s));
        let written = append(&path, &[s.clone(), g.clone()], "second").unwrap();
        assert_eq!(written, std::slice::from_ref(&g));
        let written = append(&path, std::slice::from_ref(&s), "again").unwrap();
        assert!(written.is_empty());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "# first\nserial:abcd\n# second\ngateway:gw-1\n");
        std::fs::write(&path, "serial:abcd\nnonsense").unwrap();
        let err = append(&path, &[g], "x").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
