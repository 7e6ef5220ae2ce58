//! The on-object block format: a fixed little-endian header followed by the payload.
//!
//! Every block that leaves this process for an object store is wrapped by [`encode_block`] and
//! unwrapped by [`decode_block`]. The header carries two CRC32C checksums, one of the raw bytes
//! and one of the stored payload, so that a corrupted object is reported as an error (never
//! returned as data) and corrupted compressed bytes are caught before they reach the
//! decompressor.
//!
//! ```text
//! offset size field
//!      0    4 magic            b"ELB1"
//!      4    1 version          1
//!      5    1 codec            0 = raw, 1 = zstd
//!      6    2 reserved         must be zero
//!      8    4 raw length       u32 LE, length of the decoded block
//!     12    4 raw crc32c       u32 LE, CRC32C of the decoded block
//!     16    4 payload crc32c   u32 LE, CRC32C of the bytes after the header
//!     20    . payload
//! ```
//!
//! The format is stable: objects written today must stay readable forever, so any change needs
//! a new version number and a decoder for the old one.

use std::fmt;
use std::str::FromStr;

/// Size of the fixed block header in bytes.
pub const HEADER_LEN: usize = 20;

/// First four bytes of every encoded block.
pub const MAGIC: [u8; 4] = *b"ELB1";

/// The only header version written and understood today.
pub const VERSION: u8 = 1;

/// Codec byte for a payload stored as is.
const CODEC_RAW: u8 = 0;
/// Codec byte for a zstd frame.
const CODEC_ZSTD: u8 = 1;

/// Default zstd level: fast to compress, most of the gain of higher levels.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// How a block is compressed before it is stored.
///
/// Parsed from and displayed as `none`, `zstd` (level [`DEFAULT_ZSTD_LEVEL`]) or `zstd:LEVEL`
/// with `LEVEL` in `1..=22`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Compression {
    /// Store the raw bytes.
    None,
    /// zstd at the given level. If the output is not smaller than the input, the block is stored
    /// raw anyway.
    Zstd(i32),
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Zstd(DEFAULT_ZSTD_LEVEL)
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Zstd(level) => write!(f, "zstd:{level}"),
        }
    }
}

/// A compression spec that is not `none`, `zstd` or `zstd:LEVEL` (`LEVEL` in `1..=22`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid compression {0:?}: expected \"none\", \"zstd\" or \"zstd:LEVEL\" with LEVEL in 1..=22")]
pub struct ParseCompressionError(pub String);

impl FromStr for Compression {
    type Err = ParseCompressionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseCompressionError(s.to_string());
        match s.trim() {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd(DEFAULT_ZSTD_LEVEL)),
            other => {
                let level = other.strip_prefix("zstd:").ok_or_else(err)?;
                let level: i32 = level.parse().map_err(|_| err())?;
                if (1..=22).contains(&level) { Ok(Compression::Zstd(level)) } else { Err(err()) }
            }
        }
    }
}

/// Why an encoded block could not be decoded. Every variant means the stored bytes are not what
/// was written (or were written by an incompatible version): retrying the read of the same
/// object will not help, reading another replica or rewriting the block might.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The buffer is shorter than the header.
    #[error("truncated: {len} bytes, a block has at least {HEADER_LEN}")]
    Truncated {
        /// Length of the buffer given.
        len: usize,
    },
    /// The first four bytes are not [`MAGIC`].
    #[error("bad magic {found:02x?}, expected {MAGIC:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// A header version this build does not understand.
    #[error("unsupported block version {0}, this build reads version {VERSION}")]
    UnsupportedVersion(u8),
    /// An unknown codec byte.
    #[error("unknown codec {0}")]
    UnknownCodec(u8),
    /// The reserved header bytes are not zero.
    #[error("reserved header bytes are not zero: {0:02x?}")]
    ReservedNotZero([u8; 2]),
    /// A length does not match what the header (or the object key) says.
    #[error("length mismatch ({what}): expected {expected}, found {actual}")]
    LengthMismatch {
        /// Which length: "raw payload", "decompressed", "zstd frame content size", "key length".
        what: &'static str,
        /// The length recorded in the header or the key.
        expected: u64,
        /// The length found.
        actual: u64,
    },
    /// A checksum does not match.
    #[error("checksum mismatch ({what}): stored 0x{stored:08x} computed 0x{computed:08x}")]
    ChecksumMismatch {
        /// Which checksum: "payload" or "raw".
        what: &'static str,
        /// The checksum in the header.
        stored: u32,
        /// The checksum of the bytes found.
        computed: u32,
    },
    /// The payload checksum matched but zstd could not decode it.
    #[error("zstd decompression failed: {0}")]
    Decompress(#[source] std::io::Error),
}

/// Encodes `raw` into the block format, compressing with `c` when that makes it smaller.
///
/// Never fails: if compression fails or does not help, the block is stored raw.
///
/// # Panics
///
/// If `raw` is longer than `u32::MAX` bytes. Blocks are at most a few MiB
/// ([`elea_common::BLOCK_SIZE`]), so this is a caller bug.
pub fn encode_block(raw: &[u8], c: Compression) -> Vec<u8> {
    let raw_len = u32::try_from(raw.len())
        .unwrap_or_else(|_| panic!("block of {} bytes is larger than u32::MAX", raw.len()));
    let raw_crc = crc32c::crc32c(raw);

    let compressed = match c {
        Compression::None => None,
        Compression::Zstd(level) => match zstd::bulk::compress(raw, level) {
            Ok(z) if z.len() < raw.len() => Some(z),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(level, error = %e, "zstd compression failed, storing block raw");
                None
            }
        },
    };
    let (codec, payload): (u8, &[u8]) = match &compressed {
        Some(z) => (CODEC_ZSTD, z),
        None => (CODEC_RAW, raw),
    };

    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(codec);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&raw_len.to_le_bytes());
    out.extend_from_slice(&raw_crc.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn le_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// The header fields of an encoded block, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    /// Codec byte (0 raw, 1 zstd).
    pub codec: u8,
    /// Length of the decoded block.
    pub raw_len: u32,
    /// CRC32C of the decoded block.
    pub raw_crc: u32,
    /// CRC32C of the payload.
    pub payload_crc: u32,
}

/// Parses and validates the header (magic, version, codec, reserved bytes) without touching the
/// payload.
pub fn decode_header(buf: &[u8]) -> Result<BlockHeader, CodecError> {
    if buf.len() < HEADER_LEN {
        return Err(CodecError::Truncated { len: buf.len() });
    }
    let found = [buf[0], buf[1], buf[2], buf[3]];
    if found != MAGIC {
        return Err(CodecError::BadMagic { found });
    }
    if buf[4] != VERSION {
        return Err(CodecError::UnsupportedVersion(buf[4]));
    }
    let codec = buf[5];
    if codec != CODEC_RAW && codec != CODEC_ZSTD {
        return Err(CodecError::UnknownCodec(codec));
    }
    if buf[6] != 0 || buf[7] != 0 {
        return Err(CodecError::ReservedNotZero([buf[6], buf[7]]));
    }
    Ok(BlockHeader { codec, raw_len: le_u32(buf, 8), raw_crc: le_u32(buf, 12), payload_crc: le_u32(buf, 16) })
}

/// Checks an encoded block as stored, without decoding it: the header, the decoded length it
/// claims (`raw_len`), a raw payload's length and the payload's checksum. What a copy from one
/// store to another verifies: the bytes it writes are the bytes the encoder wrote.
pub fn check_encoded(buf: &[u8], raw_len: u32) -> Result<(), CodecError> {
    let h = decode_header(buf)?;
    if h.raw_len != raw_len {
        return Err(CodecError::LengthMismatch {
            what: "decoded length",
            expected: raw_len.into(),
            actual: h.raw_len.into(),
        });
    }
    check_payload(&h, &buf[HEADER_LEN..])
}

/// A raw payload's length (cheaper than a checksum, and it catches every truncation), then
/// the payload's checksum.
fn check_payload(h: &BlockHeader, payload: &[u8]) -> Result<(), CodecError> {
    if h.codec == CODEC_RAW && payload.len() != h.raw_len as usize {
        return Err(CodecError::LengthMismatch {
            what: "raw payload",
            expected: h.raw_len.into(),
            actual: payload.len() as u64,
        });
    }
    let payload_crc = crc32c::crc32c(payload);
    if payload_crc != h.payload_crc {
        return Err(CodecError::ChecksumMismatch {
            what: "payload",
            stored: h.payload_crc,
            computed: payload_crc,
        });
    }
    Ok(())
}

/// Decodes a block written by [`encode_block`], checking the header, both checksums and every
/// length. Any mismatch is an error, never data.
pub fn decode_block(buf: &[u8]) -> Result<Vec<u8>, CodecError> {
    let h = decode_header(buf)?;
    let payload = &buf[HEADER_LEN..];
    let raw_len = h.raw_len as usize;
    check_payload(&h, payload)?;

    let raw = if h.codec == CODEC_RAW {
        payload.to_vec()
    } else {
        // Our encoder always records the content size in the frame. Compare it before
        // allocating, so a header claiming a huge length cannot make us allocate it.
        match zstd::zstd_safe::get_frame_content_size(payload) {
            Ok(Some(n)) if n != u64::from(h.raw_len) => {
                return Err(CodecError::LengthMismatch {
                    what: "zstd frame content size",
                    expected: h.raw_len.into(),
                    actual: n,
                });
            }
            Ok(_) => {}
            Err(_) => {
                return Err(CodecError::Decompress(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "not a zstd frame",
                )));
            }
        }
        let out = zstd::bulk::decompress(payload, raw_len).map_err(CodecError::Decompress)?;
        if out.len() != raw_len {
            return Err(CodecError::LengthMismatch {
                what: "decompressed",
                expected: h.raw_len.into(),
                actual: out.len() as u64,
            });
        }
        out
    };

    let raw_crc = crc32c::crc32c(&raw);
    if raw_crc != h.raw_crc {
        return Err(CodecError::ChecksumMismatch { what: "raw", stored: h.raw_crc, computed: raw_crc });
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        assert_eq!("none".parse::<Compression>(), Ok(Compression::None));
        assert_eq!("zstd".parse::<Compression>(), Ok(Compression::Zstd(3)));
        assert_eq!("zstd:1".parse::<Compression>(), Ok(Compression::Zstd(1)));
        assert_eq!("zstd:22".parse::<Compression>(), Ok(Compression::Zstd(22)));
        for bad in ["", "zstd:0", "zstd:23", "zstd:-1", "zstd:", "zstd:x", "lz4", "ZSTD", "zstd3"] {
            assert!(bad.parse::<Compression>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(Compression::default(), Compression::Zstd(3));
        for c in [Compression::None, Compression::Zstd(3), Compression::Zstd(19)] {
            assert_eq!(c.to_string().parse::<Compression>(), Ok(c));
        }
        assert_eq!(Compression::None.to_string(), "none");
        assert_eq!(Compression::Zstd(7).to_string(), "zstd:7");
    }

    #[test]
    fn header_layout_is_pinned() {
        let enc = encode_block(b"hello", Compression::None);
        assert_eq!(enc.len(), HEADER_LEN + 5);
        assert_eq!(&enc[0..4], b"ELB1");
        assert_eq!(enc[4], 1);
        assert_eq!(enc[5], 0);
        assert_eq!(&enc[6..8], &[0, 0]);
        assert_eq!(le_u32(&enc, 8), 5);
        assert_eq!(le_u32(&enc, 12), crc32c::crc32c(b"hello"));
        assert_eq!(le_u32(&enc, 16), crc32c::crc32c(b"hello"));
        assert_eq!(&enc[20..], b"hello");
    }

    #[test]
    fn check_encoded_catches_every_change_a_copy_could_make() {
        let raw: Vec<u8> = (0..20_000u32).map(|i| (i % 7) as u8).collect();
        for c in [Compression::None, Compression::Zstd(3)] {
            let enc = encode_block(&raw, c);
            assert!(check_encoded(&enc, raw.len() as u32).is_ok());
            assert!(check_encoded(&enc, raw.len() as u32 + 1).is_err(), "wrong length");
            assert!(check_encoded(&enc[..enc.len() - 1], raw.len() as u32).is_err(), "truncated");
            for at in [0, 5, HEADER_LEN, enc.len() - 1] {
                let mut bad = enc.clone();
                bad[at] ^= 0x40;
                assert!(check_encoded(&bad, raw.len() as u32).is_err(), "{c} flipped byte {at}");
            }
        }
    }

    #[test]
    fn empty_block_round_trips() {
        for c in [Compression::None, Compression::Zstd(3)] {
            let enc = encode_block(&[], c);
            assert_eq!(enc.len(), HEADER_LEN);
            assert_eq!(decode_block(&enc).map_err(|e| e.to_string()), Ok(vec![]));
        }
    }
}
