//! Store URLs: parsing `file://`, `s3://`, `gs://`, `az://` and `memory://` into a
//! [`Location`], with errors that name what is wrong with the URL.
//!
//! Parsing is separate from building the opendal operator so it can be tested without any
//! network or environment.

/// A parsed store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    /// `file:///abs/path`: a local directory.
    File { root: String },
    /// `s3://bucket/prefix?endpoint=..&region=..&anonymous=true`.
    S3 { bucket: String, prefix: String, endpoint: Option<String>, region: Option<String>, anonymous: bool },
    /// `gs://bucket/prefix?endpoint=..`.
    Gcs { bucket: String, prefix: String, endpoint: Option<String> },
    /// `az://container/prefix?endpoint=..`.
    Azure { container: String, prefix: String, endpoint: Option<String> },
    /// `memory://` (private to the store) or `memory://NAME` (shared by every store opened with
    /// the same name in this process).
    Memory { name: String },
}

/// `key=value` pairs of a URL query, in order.
type Query<'a> = Vec<(&'a str, &'a str)>;

/// Splits `s` at the first `?` into the part before and the query pairs.
fn split_query(s: &str) -> Result<(&str, Query<'_>), String> {
    let Some((head, query)) = s.split_once('?') else { return Ok((s, Vec::new())) };
    let mut pairs = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| format!("query parameter {pair:?} has no '='"))?;
        if pairs.iter().any(|(seen, _)| *seen == k) {
            return Err(format!("query parameter {k:?} given twice"));
        }
        pairs.push((k, v));
    }
    Ok((head, pairs))
}

/// Checks an `endpoint=` value: `http(s)://host[:port]` with an optional path.
fn check_endpoint(e: &str) -> Result<String, String> {
    let rest = e
        .strip_prefix("http://")
        .or_else(|| e.strip_prefix("https://"))
        .ok_or_else(|| format!("endpoint {e:?} must start with http:// or https://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        // An IPv6 literal "[::1]" without a port has ':' inside the brackets.
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (authority, None),
    };
    if host.is_empty() {
        return Err(format!("endpoint {e:?} has no host"));
    }
    if let Some(p) = port
        && p.parse::<u16>().is_err()
    {
        return Err(format!("endpoint {e:?} has a bad port {p:?}"));
    }
    if host.chars().any(|c| c.is_whitespace() || c == '@') {
        return Err(format!("endpoint {e:?} has a bad host {host:?}"));
    }
    Ok(e.trim_end_matches('/').to_string())
}

/// Splits `bucket/prefix` and checks the bucket (or container) name.
fn bucket_and_prefix<'a>(rest: &'a str, what: &str) -> Result<(&'a str, String), String> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!("missing {what} name"));
    }
    if !bucket.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')) {
        return Err(format!("bad {what} name {bucket:?}"));
    }
    let prefix = prefix.trim_matches('/');
    if prefix.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(format!("prefix {prefix:?} must not contain '.' or '..' segments"));
    }
    Ok((bucket, prefix.to_string()))
}

fn take_param(pairs: &mut Query<'_>, name: &str) -> Option<String> {
    let i = pairs.iter().position(|(k, _)| *k == name)?;
    Some(pairs.remove(i).1.to_string())
}

fn no_more_params(pairs: &[(&str, &str)], scheme: &str) -> Result<(), String> {
    match pairs.first() {
        None => Ok(()),
        Some((k, _)) => Err(format!("unknown query parameter {k:?} for {scheme}://")),
    }
}

impl Location {
    /// Parses a store URL. The error says what is wrong; the caller adds the URL.
    pub(crate) fn parse(url: &str) -> Result<Location, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or("expected SCHEME://..., with SCHEME one of file, s3, gs, az, memory")?;
        match scheme {
            "file" => {
                if rest.contains('?') {
                    return Err("file:// URLs take no query parameters".into());
                }
                if !rest.starts_with('/') {
                    return Err(
                        "file:// needs an absolute path (file:///abs/path); hosts and relative paths are not supported"
                            .into(),
                    );
                }
                if rest.split('/').any(|seg| seg == "." || seg == "..") {
                    return Err("file:// path must not contain '.' or '..' segments".into());
                }
                Ok(Location::File { root: rest.to_string() })
            }
            "s3" => {
                let (head, mut q) = split_query(rest)?;
                let (bucket, prefix) = bucket_and_prefix(head, "bucket")?;
                let endpoint = take_param(&mut q, "endpoint").map(|e| check_endpoint(&e)).transpose()?;
                let region = take_param(&mut q, "region");
                if region.as_deref() == Some("") {
                    return Err("empty region".into());
                }
                let anonymous = match take_param(&mut q, "anonymous").as_deref() {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(v) => return Err(format!("anonymous must be true or false, not {v:?}")),
                };
                no_more_params(&q, scheme)?;
                Ok(Location::S3 { bucket: bucket.to_string(), prefix, endpoint, region, anonymous })
            }
            "gs" | "az" => {
                let (head, mut q) = split_query(rest)?;
                let what = if scheme == "gs" { "bucket" } else { "container" };
                let (bucket, prefix) = bucket_and_prefix(head, what)?;
                let endpoint = take_param(&mut q, "endpoint").map(|e| check_endpoint(&e)).transpose()?;
                no_more_params(&q, scheme)?;
                let bucket = bucket.to_string();
                Ok(if scheme == "gs" {
                    Location::Gcs { bucket, prefix, endpoint }
                } else {
                    Location::Azure { container: bucket, prefix, endpoint }
                })
            }
            "memory" => {
                let (head, q) = split_query(rest)?;
                no_more_params(&q, scheme)?;
                Ok(Location::Memory { name: head.trim_matches('/').to_string() })
            }
            other => Err(format!("unknown scheme {other:?}: expected file, s3, gs, az or memory")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(bucket: &str, prefix: &str, endpoint: Option<&str>, region: Option<&str>) -> Location {
        Location::S3 {
            bucket: bucket.into(),
            prefix: prefix.into(),
            endpoint: endpoint.map(Into::into),
            region: region.map(Into::into),
            anonymous: false,
        }
    }

    #[test]
    fn good_urls() {
        assert_eq!(Location::parse("file:///data/elea"), Ok(Location::File { root: "/data/elea".into() }));
        assert_eq!(Location::parse("file:///"), Ok(Location::File { root: "/".into() }));
        assert_eq!(Location::parse("s3://bkt"), Ok(s3("bkt", "", None, None)));
        assert_eq!(Location::parse("s3://bkt/"), Ok(s3("bkt", "", None, None)));
        assert_eq!(Location::parse("s3://bkt/a/b/"), Ok(s3("bkt", "a/b", None, None)));
        assert_eq!(
            Location::parse("s3://bkt/pre?endpoint=http://127.0.0.1:9000&region=eu-west-1"),
            Ok(s3("bkt", "pre", Some("http://127.0.0.1:9000"), Some("eu-west-1")))
        );
        assert_eq!(
            Location::parse("s3://bkt/?region=r&endpoint=https://s3.example.com/"),
            Ok(s3("bkt", "", Some("https://s3.example.com"), Some("r")))
        );
        assert!(matches!(
            Location::parse("s3://bkt?anonymous=true"),
            Ok(Location::S3 { anonymous: true, .. })
        ));
        assert_eq!(
            Location::parse("gs://g-bkt/x"),
            Ok(Location::Gcs { bucket: "g-bkt".into(), prefix: "x".into(), endpoint: None })
        );
        assert_eq!(
            Location::parse("az://cont/p/q?endpoint=http://[::1]:10000/devstoreaccount1"),
            Ok(Location::Azure {
                container: "cont".into(),
                prefix: "p/q".into(),
                endpoint: Some("http://[::1]:10000/devstoreaccount1".into()),
            })
        );
        assert_eq!(Location::parse("memory://"), Ok(Location::Memory { name: String::new() }));
        assert_eq!(Location::parse("memory://shared"), Ok(Location::Memory { name: "shared".into() }));
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        let cases = [
            ("", "SCHEME://"),
            ("/abs/path", "SCHEME://"),
            ("ftp://host/x", "unknown scheme \"ftp\""),
            ("S3://bkt", "unknown scheme"),
            ("file://relative/path", "absolute path"),
            ("file://", "absolute path"),
            ("file:///a/../b", "'..'"),
            ("file:///a?x=1", "no query"),
            ("s3://", "missing bucket"),
            ("s3:///prefix", "missing bucket"),
            ("s3://bad bucket/x", "bad bucket"),
            ("s3://bkt/a/../b", "'..'"),
            ("s3://bkt?endpoint=127.0.0.1:9000", "http:// or https://"),
            ("s3://bkt?endpoint=http://", "no host"),
            ("s3://bkt?endpoint=http://:9000", "no host"),
            ("s3://bkt?endpoint=http://h:port", "bad port"),
            ("s3://bkt?endpoint=http://h:99999", "bad port"),
            ("s3://bkt?region=", "empty region"),
            ("s3://bkt?endpoint", "no '='"),
            ("s3://bkt?endpont=http://h", "unknown query parameter \"endpont\""),
            ("s3://bkt?region=a&region=b", "twice"),
            ("s3://bkt?anonymous=yes", "anonymous"),
            ("gs://", "missing bucket"),
            ("gs://b?region=x", "unknown query parameter"),
            ("az:///p", "missing container"),
            ("az://c?endpoint=ftp://x", "http:// or https://"),
            ("memory://?x=1", "unknown query parameter"),
        ];
        for (url, want) in cases {
            match Location::parse(url) {
                Ok(loc) => panic!("{url:?} parsed as {loc:?}"),
                Err(e) => assert!(e.contains(want), "{url:?}: error {e:?} does not mention {want:?}"),
            }
        }
    }
}
