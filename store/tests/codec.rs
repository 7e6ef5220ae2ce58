//! Block codec properties: round trips, raw fallback for incompressible data, and detection of
//! every single-bit flip, truncation and bad header field.

use elea_store::codec::{CodecError, MAGIC, decode_header};
use elea_store::{Compression, HEADER_LEN, decode_block, encode_block};
use proptest::prelude::*;

/// Deterministic pseudo-random (incompressible) bytes.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

/// Compressible bytes: short random words repeated.
fn text(len: usize, seed: u64) -> Vec<u8> {
    let words = noise(64, seed | 1);
    words.chunks(8).cycle().flat_map(|w| w.iter().copied().chain([b' '])).take(len).collect()
}

fn compression() -> impl Strategy<Value = Compression> {
    prop_oneof![Just(Compression::None), (1i32..=6).prop_map(Compression::Zstd)]
}

/// Either random or compressible data, 0..32 KiB.
fn data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..32 * 1024),
        (0usize..32 * 1024, any::<u64>()).prop_map(|(len, seed)| text(len, seed)),
        (0usize..32 * 1024, any::<u8>()).prop_map(|(len, b)| vec![b; len]),
    ]
}

fn codec_byte(enc: &[u8]) -> u8 {
    enc[5]
}

proptest! {
    #[test]
    fn round_trip(raw in data(), c in compression()) {
        let enc = encode_block(&raw, c);
        prop_assert!(enc.len() <= HEADER_LEN + raw.len(), "encoding never grows beyond the header");
        let dec = decode_block(&enc);
        prop_assert!(dec.is_ok(), "{:?}", dec.err());
        prop_assert_eq!(dec.ok(), Some(raw));
    }

    #[test]
    fn single_bit_flip_is_detected(raw in data(), c in compression(), pos in any::<proptest::sample::Index>()) {
        let enc = encode_block(&raw, c);
        let bit = pos.index(enc.len() * 8);
        let mut bad = enc.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(decode_block(&bad).is_err(), "flip of bit {} went unnoticed", bit);
    }

    #[test]
    fn truncation_is_detected(raw in data(), c in compression(), pos in any::<proptest::sample::Index>()) {
        let enc = encode_block(&raw, c);
        let cut = pos.index(enc.len());
        prop_assert!(decode_block(&enc[..cut]).is_err(), "truncation to {} went unnoticed", cut);
    }

    #[test]
    fn appended_bytes_are_detected(raw in data(), c in compression(), extra in proptest::collection::vec(any::<u8>(), 1..64)) {
        let mut enc = encode_block(&raw, c);
        enc.extend_from_slice(&extra);
        prop_assert!(decode_block(&enc).is_err());
    }
}

/// Every bit of a few small blocks, both codecs: exhaustive rather than sampled.
#[test]
fn every_single_bit_flip_and_truncation_is_detected() {
    for (raw, c, want_codec) in [
        (text(600, 7), Compression::Zstd(3), 1),
        (noise(300, 9), Compression::Zstd(3), 0),
        (text(300, 3), Compression::None, 0),
        (Vec::new(), Compression::Zstd(3), 0),
    ] {
        let enc = encode_block(&raw, c);
        assert_eq!(codec_byte(&enc), want_codec);
        for bit in 0..enc.len() * 8 {
            let mut bad = enc.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_block(&bad).is_err(), "flip of bit {bit} of a {c} block went unnoticed");
        }
        for cut in 0..enc.len() {
            assert!(decode_block(&enc[..cut]).is_err(), "truncation to {cut} of a {c} block went unnoticed");
        }
    }
}

#[test]
fn incompressible_data_is_stored_raw() {
    for len in [1, 100, 4096, 1 << 20] {
        let raw = noise(len, len as u64);
        let enc = encode_block(&raw, Compression::Zstd(3));
        assert_eq!(codec_byte(&enc), 0, "len {len}");
        assert_eq!(enc.len(), HEADER_LEN + len);
        assert_eq!(&enc[HEADER_LEN..], &raw[..]);
        assert_eq!(decode_block(&enc).ok(), Some(raw));
    }
}

#[test]
fn compressible_data_is_compressed() {
    let raw = text(4 << 20, 1);
    let enc = encode_block(&raw, Compression::Zstd(3));
    assert_eq!(codec_byte(&enc), 1);
    assert!(enc.len() < raw.len() / 4, "{} bytes", enc.len());
    assert_eq!(decode_block(&enc).ok(), Some(raw.clone()));
    let h = decode_header(&enc).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(h.raw_len as usize, raw.len());
    assert_eq!(h.raw_crc, crc32c::crc32c(&raw));
    assert_eq!(h.payload_crc, crc32c::crc32c(&enc[HEADER_LEN..]));
}

fn decode_err(buf: &[u8]) -> CodecError {
    match decode_block(buf) {
        Ok(v) => panic!("decoded {} bytes from a bad block", v.len()),
        Err(e) => e,
    }
}

/// A copy of `enc` with `edit` applied.
fn with_header(enc: &[u8], edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut b = enc.to_vec();
    edit(&mut b);
    b
}

#[test]
fn header_fields_are_validated() {
    let raw = text(10_000, 5);
    let z = encode_block(&raw, Compression::Zstd(3));
    let r = encode_block(&raw, Compression::None);
    assert_eq!(codec_byte(&z), 1);
    assert_eq!(&z[..4], &MAGIC);

    let e = decode_err(&with_header(&z, |b| b[0] = b'X'));
    assert!(matches!(e, CodecError::BadMagic { .. }), "{e}");
    assert!(e.to_string().contains("bad magic"), "{e}");

    let e = decode_err(&with_header(&z, |b| b[4] = 2));
    assert!(matches!(e, CodecError::UnsupportedVersion(2)), "{e}");

    let e = decode_err(&with_header(&z, |b| b[5] = 7));
    assert!(matches!(e, CodecError::UnknownCodec(7)), "{e}");

    let e = decode_err(&with_header(&z, |b| b[7] = 1));
    assert!(matches!(e, CodecError::ReservedNotZero(_)), "{e}");

    // Raw length that does not match: raw codec catches it by length, zstd by frame size,
    // without allocating the claimed size.
    let e = decode_err(&with_header(&r, |b| b[8..12].copy_from_slice(&u32::MAX.to_le_bytes())));
    assert!(matches!(e, CodecError::LengthMismatch { .. }), "{e}");
    let e = decode_err(&with_header(&z, |b| b[8..12].copy_from_slice(&u32::MAX.to_le_bytes())));
    assert!(matches!(e, CodecError::LengthMismatch { .. }), "{e}");

    let e = decode_err(&with_header(&z, |b| b[12] ^= 1));
    assert!(matches!(e, CodecError::ChecksumMismatch { what: "raw", .. }), "{e}");
    assert!(e.to_string().starts_with("checksum mismatch (raw): stored 0x"), "{e}");

    let e = decode_err(&with_header(&z, |b| b[16] ^= 1));
    assert!(matches!(e, CodecError::ChecksumMismatch { what: "payload", .. }), "{e}");

    // Corrupt compressed bytes are caught by the payload checksum, before zstd sees them.
    let last = z.len() - 1;
    let e = decode_err(&with_header(&z, |b| b[last] ^= 0x80));
    assert!(matches!(e, CodecError::ChecksumMismatch { what: "payload", .. }), "{e}");

    // Switching the codec byte with an intact payload checksum is still caught.
    let e = decode_err(&with_header(&z, |b| b[5] = 0));
    assert!(matches!(e, CodecError::LengthMismatch { .. }), "{e}");
    let e = decode_err(&with_header(&r, |b| b[5] = 1));
    assert!(matches!(e, CodecError::Decompress(_) | CodecError::LengthMismatch { .. }), "{e}");

    let e = decode_err(&z[..HEADER_LEN - 1]);
    assert!(matches!(e, CodecError::Truncated { .. }), "{e}");
    assert!(e.to_string().starts_with("truncated"), "{e}");
}
