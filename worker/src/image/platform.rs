//! Platforms (`linux/arm/v7`): detecting the host's, and choosing an entry of an image index
//! with containerd's matcher rules (spec §6.6). Pure apart from [`host`], which reads
//! /proc/cpuinfo once; it does not cover Windows or OS features.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    /// `v7`, `v8`, or empty.
    pub variant: String,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if !self.variant.is_empty() {
            write!(f, "/{}", self.variant)?;
        }
        Ok(())
    }
}

impl Platform {
    pub fn new(os: &str, architecture: &str, variant: &str) -> Platform {
        Platform {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.to_owned(),
        }
    }

    /// Parses `os/arch[/variant]` (also `arch[/variant]`, meaning linux) with the usual aliases
    /// (`aarch64`, `x86_64`, `armhf`), normalised as containerd does.
    pub fn parse(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let (os, arch, variant) = match parts.as_slice() {
            [os @ ("linux" | "windows" | "darwin" | "freebsd"), arch] => (*os, *arch, ""),
            [os @ ("linux" | "windows" | "darwin" | "freebsd"), arch, v] => (*os, *arch, *v),
            [arch] => ("linux", *arch, ""),
            [arch, v] => ("linux", *arch, *v),
            _ => {
                return Err(format!(
                    "invalid platform {s:?}: expected os/arch[/variant], e.g. linux/arm/v7"
                ))
            }
        };
        if arch.is_empty() || !arch.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("invalid platform {s:?}: bad architecture"));
        }
        Ok(Platform::new(os, arch, variant).normalized())
    }

    /// containerd's `platforms.Normalize`: architecture aliases and default variants.
    pub fn normalized(&self) -> Platform {
        let os = self.os.to_ascii_lowercase();
        let arch = self.architecture.to_ascii_lowercase();
        let variant = self.variant.to_ascii_lowercase();
        let (arch, variant) = match (arch.as_str(), variant.as_str()) {
            ("i386", _) => ("386", String::new()),
            ("x86_64" | "x86-64" | "amd64", "v1") => ("amd64", String::new()),
            ("x86_64" | "x86-64", _) => ("amd64", variant),
            ("aarch64" | "arm64", "8" | "v8") => ("arm64", String::new()),
            ("aarch64" | "arm64", _) => ("arm64", variant),
            ("armhf", _) => ("arm", "v7".to_owned()),
            ("armel", _) => ("arm", "v6".to_owned()),
            ("arm", "") => ("arm", "v7".to_owned()),
            ("arm", "5" | "6" | "7" | "8") => ("arm", format!("v{variant}")),
            (a, _) => (a, variant),
        };
        Platform {
            os,
            architecture: arch.to_owned(),
            variant,
        }
    }

    /// Candidates this host can run, best first: arm/v7 also runs v6 and v5 images (the
    /// order containerd's `platforms.Only` prefers). No cross-architecture fallbacks.
    pub fn acceptable(&self) -> Vec<Platform> {
        let p = self.normalized();
        let mut out = vec![p.clone()];
        if p.architecture == "arm" {
            let lower: &[&str] = match p.variant.as_str() {
                "v8" => &["v7", "v6", "v5"],
                "v7" => &["v6", "v5"],
                "v6" => &["v5"],
                _ => &[],
            };
            for v in lower {
                out.push(Platform::new(&p.os, "arm", v));
            }
        }
        out
    }

    /// Rank of `candidate` for this host (0 = best), or None if it cannot run here.
    pub fn rank(&self, candidate: &Platform) -> Option<usize> {
        let c = candidate.normalized();
        self.acceptable().iter().position(|p| *p == c)
    }
}

/// The platform of this process: linux, the compiled architecture, and for 32-bit arm the
/// CPU's variant from /proc/cpuinfo.
pub fn host() -> Platform {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "x86" => "386",
        other => other,
    };
    let variant = if arch == "arm" {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        arm_variant(&info)
    } else {
        String::new()
    };
    Platform::new("linux", arch, &variant).normalized()
}

/// A 32-bit arm process's variant from /proc/cpuinfo, as containerd's `getCPUVariant`:
/// "CPU architecture: 7" is v7, but Pi 1/Zero kernels report 7 for their ARMv6 core, so the
/// model name wins; a 64-bit kernel (Pi 4 running 32-bit Raspberry Pi OS) reports 8, and a
/// 32-bit userland there runs v7 code. Unknown → v7, the common case on a Pi.
pub fn arm_variant(cpuinfo: &str) -> String {
    let field = |name: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_ascii_lowercase())
        })
    };
    let model = field("model name").unwrap_or_default();
    if model.starts_with("armv6") {
        return "v6".to_owned();
    }
    match field("CPU architecture").as_deref() {
        Some("5" | "5t" | "5te" | "5tej") => "v5",
        Some("6" | "6tej") => "v6",
        _ => "v7",
    }
    .to_owned()
}

/// An index entry as far as selection needs it.
pub struct Entry<'a> {
    pub platform: Option<&'a Platform>,
    /// `vnd.docker.reference.type` annotation (buildx attestation manifests).
    pub reference_type: Option<&'a str>,
}

/// Index of the best entry for `want`, first in index order among equals. Entries without a
/// platform, with os `unknown` or marked as attestations are never chosen.
pub fn select(want: &Platform, entries: &[Entry<'_>]) -> Option<usize> {
    entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.reference_type.is_none())
        .filter_map(|(i, e)| {
            let p = e.platform?;
            if p.os == "unknown" {
                return None;
            }
            want.rank(p).map(|r| (r, i))
        })
        .min()
        .map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        Platform::parse(s).unwrap()
    }

    #[test]
    fn parse_and_normalize() {
        assert_eq!(p("linux/amd64").to_string(), "linux/amd64");
        assert_eq!(p("linux/x86_64").to_string(), "linux/amd64");
        assert_eq!(p("linux/aarch64").to_string(), "linux/arm64");
        assert_eq!(p("linux/arm64/v8").to_string(), "linux/arm64");
        assert_eq!(p("linux/arm").to_string(), "linux/arm/v7");
        assert_eq!(p("linux/arm/7").to_string(), "linux/arm/v7");
        assert_eq!(p("armhf").to_string(), "linux/arm/v7");
        assert_eq!(p("arm/v6").to_string(), "linux/arm/v6");
        assert!(Platform::parse("linux/").is_err());
        assert!(Platform::parse("a/b/c/d").is_err());
    }

    #[test]
    fn arm_fallbacks_in_containerd_order() {
        let v7 = p("linux/arm/v7");
        assert_eq!(v7.rank(&p("linux/arm/v7")), Some(0));
        assert_eq!(v7.rank(&p("linux/arm/v6")), Some(1));
        assert_eq!(v7.rank(&p("linux/arm/v5")), Some(2));
        assert_eq!(v7.rank(&Platform::new("linux", "arm", "")), Some(0));
        assert_eq!(v7.rank(&p("linux/arm64")), None);
        let v6 = p("linux/arm/v6");
        assert_eq!(v6.rank(&p("linux/arm/v7")), None);
        let arm64 = p("linux/arm64");
        assert_eq!(arm64.rank(&Platform::new("linux", "arm64", "v8")), Some(0));
        assert_eq!(arm64.rank(&p("linux/arm/v7")), None);
        assert_eq!(p("linux/amd64").rank(&p("linux/386")), None);
    }

    #[test]
    fn selection_skips_attestations_and_prefers_exact() {
        let amd = p("linux/amd64");
        let v6 = p("linux/arm/v6");
        let v7 = p("linux/arm/v7");
        let unknown = Platform::new("unknown", "unknown", "");
        let entries = [
            Entry {
                platform: Some(&v6),
                reference_type: None,
            },
            Entry {
                platform: Some(&unknown),
                reference_type: None,
            },
            Entry {
                platform: Some(&v7),
                reference_type: Some("attestation-manifest"),
            },
            Entry {
                platform: Some(&amd),
                reference_type: None,
            },
            Entry {
                platform: Some(&v7),
                reference_type: None,
            },
            Entry {
                platform: None,
                reference_type: None,
            },
        ];
        assert_eq!(select(&v7, &entries), Some(4));
        assert_eq!(select(&amd, &entries), Some(3));
        assert_eq!(select(&p("linux/arm/v5"), &entries), None);
        assert_eq!(
            select(&v7, &entries[..4]),
            Some(0),
            "v6 is the fallback for v7"
        );
        assert_eq!(select(&p("linux/arm64"), &entries), None);
    }

    #[test]
    fn cpuinfo_variants() {
        let pi3 =
            "processor\t: 0\nmodel name\t: ARMv7 Processor rev 4 (v7l)\nCPU architecture: 7\n";
        assert_eq!(arm_variant(pi3), "v7");
        let zero = "model name\t: ARMv6-compatible processor rev 7 (v6l)\nCPU architecture: 7\n";
        assert_eq!(arm_variant(zero), "v6");
        let pi4_64bit_kernel = "processor\t: 0\nBogoMIPS\t: 108.00\nCPU architecture: 8\n";
        assert_eq!(arm_variant(pi4_64bit_kernel), "v7");
        assert_eq!(arm_variant("CPU architecture: 5TEJ\n"), "v5");
        assert_eq!(arm_variant(""), "v7");
    }

    #[test]
    fn host_is_linux_and_normalized() {
        let h = host();
        assert_eq!(h.os, "linux");
        assert_eq!(h, h.normalized());
        #[cfg(target_arch = "x86_64")]
        assert_eq!(h.to_string(), "linux/amd64");
    }
}
