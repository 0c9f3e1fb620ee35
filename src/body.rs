//! Bodies: bounded reading, and Content-Encoding decode / re-encode
//! (gzip, deflate, br, zstd). Decoded size is bounded too (no zip bombs).

use bytes::Bytes;
use http_body_util::BodyExt;
use std::io::{Read, Write};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

#[derive(Debug, PartialEq, Eq)]
pub enum BodyReadError {
    /// Over `max_body_bytes` (413).
    TooLarge,
    /// Unknown Content-Encoding (415), carrying the encoding name.
    UnknownEncoding(String),
    /// Could not be read or decoded (422).
    Unreadable(String),
}

impl Encoding {
    /// From a Content-Encoding header value. Only one coding is accepted.
    pub fn parse(v: Option<&str>) -> Result<Encoding, BodyReadError> {
        let Some(v) = v else {
            return Ok(Encoding::Identity);
        };
        match v.trim().to_ascii_lowercase().as_str() {
            "" | "identity" => Ok(Encoding::Identity),
            "gzip" | "x-gzip" => Ok(Encoding::Gzip),
            "deflate" => Ok(Encoding::Deflate),
            "br" => Ok(Encoding::Brotli),
            "zstd" => Ok(Encoding::Zstd),
            other => Err(BodyReadError::UnknownEncoding(
                other
                    .chars()
                    .filter(|c| c.is_ascii_graphic() || *c == ',')
                    .take(64)
                    .collect(),
            )),
        }
    }
}

/// Read a whole body, refusing more than `limit` bytes.
pub async fn read_limited<B>(body: B, limit: u64) -> Result<Bytes, BodyReadError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limited = http_body_util::Limited::new(body, limit as usize);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.is::<http_body_util::LengthLimitError>() {
                Err(BodyReadError::TooLarge)
            } else {
                Err(BodyReadError::Unreadable(format!(
                    "body could not be read: {e}"
                )))
            }
        }
    }
}

/// Decode to plain bytes, at most `limit` decoded bytes.
pub fn decode(enc: Encoding, data: &[u8], limit: u64) -> Result<Vec<u8>, BodyReadError> {
    let reader: Box<dyn Read + '_> = match enc {
        Encoding::Identity => return Ok(data.to_vec()),
        Encoding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(data)),
        Encoding::Deflate => {
            // "deflate" is zlib-wrapped per RFC 9110; some clients send raw deflate.
            if data.len() >= 2 && (u16::from(data[0]) << 8 | u16::from(data[1])).is_multiple_of(31)
            {
                Box::new(flate2::read::ZlibDecoder::new(data))
            } else {
                Box::new(flate2::read::DeflateDecoder::new(data))
            }
        }
        Encoding::Brotli => Box::new(brotli::Decompressor::new(data, 4096)),
        Encoding::Zstd => Box::new(
            zstd::stream::read::Decoder::new(data)
                .map_err(|e| BodyReadError::Unreadable(format!("zstd: {e}")))?,
        ),
    };
    let mut out = Vec::new();
    let n = reader
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| BodyReadError::Unreadable(format!("could not decode {enc:?} body: {e}")))?;
    if n as u64 > limit {
        return Err(BodyReadError::TooLarge);
    }
    Ok(out)
}

/// Encode again with the same coding the client used.
pub fn encode(enc: Encoding, data: &[u8]) -> Result<Vec<u8>, String> {
    let io = |e: std::io::Error| format!("could not encode body: {e}");
    match enc {
        Encoding::Identity => Ok(data.to_vec()),
        Encoding::Gzip => {
            let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            w.write_all(data).map_err(io)?;
            w.finish().map_err(io)
        }
        Encoding::Deflate => {
            let mut w = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            w.write_all(data).map_err(io)?;
            w.finish().map_err(io)
        }
        Encoding::Brotli => {
            let mut out = Vec::new();
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                w.write_all(data).map_err(io)?;
            }
            Ok(out)
        }
        Encoding::Zstd => zstd::stream::encode_all(data, 3).map_err(io),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_coding() {
        let data = br#"{"data":[{"event_name":"Lead"}]}"#.repeat(20);
        for enc in [
            Encoding::Gzip,
            Encoding::Deflate,
            Encoding::Brotli,
            Encoding::Zstd,
        ] {
            let e = encode(enc, &data).unwrap();
            assert_eq!(decode(enc, &e, 1 << 20).unwrap(), data, "{enc:?}");
            assert_eq!(decode(enc, &e, 10), Err(BodyReadError::TooLarge), "{enc:?}");
        }
        assert!(matches!(
            Encoding::parse(Some("foo")),
            Err(BodyReadError::UnknownEncoding(_))
        ));
        assert!(matches!(
            decode(Encoding::Gzip, b"not gzip", 100),
            Err(BodyReadError::Unreadable(_))
        ));
    }
}
