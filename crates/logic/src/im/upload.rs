//! Attachments: `POST /attach/upload` (multipart `file`, optional
//! `filetype`) stores an image, audio or video file under `im.upload_dir`
//! with a generated name and answers its URL; `GET /attach/files/{name}`
//! serves it back.
//!
//! A file is accepted only when its extension (from `filetype`, else the
//! file name) is on the allowlist AND its first bytes are one of the formats
//! we know, of the same family (an image named `.png` may be a JPEG; a text
//! file named `.png` is refused). It is stored under the extension of what
//! it really is, so it is served with the right type. The client's file name
//! never becomes a path: names are random hex plus our own extension.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_LENGTH, CONTENT_SECURITY_POLICY, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::collections::HashMap;
use tracing::{Span, info};

use super::im_user;
use crate::app::App;
use crate::error::{ApiError, ImError, ImReply, ImResult};

/// Families a format belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Image,
    Audio,
    Video,
}

/// A format recognised by its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Format {
    /// Stored (and served) extension.
    ext: &'static str,
    mime: &'static str,
    families: &'static [Family],
}

const PNG: Format = Format {
    ext: "png",
    mime: "image/png",
    families: &[Family::Image],
};
const JPEG: Format = Format {
    ext: "jpg",
    mime: "image/jpeg",
    families: &[Family::Image],
};
const GIF: Format = Format {
    ext: "gif",
    mime: "image/gif",
    families: &[Family::Image],
};
const WEBP: Format = Format {
    ext: "webp",
    mime: "image/webp",
    families: &[Family::Image],
};
const WAV: Format = Format {
    ext: "wav",
    mime: "audio/wav",
    families: &[Family::Audio],
};
const MP3: Format = Format {
    ext: "mp3",
    mime: "audio/mpeg",
    families: &[Family::Audio],
};
const AAC: Format = Format {
    ext: "aac",
    mime: "audio/aac",
    families: &[Family::Audio],
};
const FLAC: Format = Format {
    ext: "flac",
    mime: "audio/flac",
    families: &[Family::Audio],
};
const AMR: Format = Format {
    ext: "amr",
    mime: "audio/amr",
    families: &[Family::Audio],
};
const M4A: Format = Format {
    ext: "m4a",
    mime: "audio/mp4",
    families: &[Family::Audio],
};
const OGG: Format = Format {
    ext: "ogg",
    mime: "audio/ogg",
    families: &[Family::Audio, Family::Video],
};
const MP4: Format = Format {
    ext: "mp4",
    mime: "video/mp4",
    families: &[Family::Video, Family::Audio],
};
const MOV: Format = Format {
    ext: "mov",
    mime: "video/quicktime",
    families: &[Family::Video],
};
const WEBM: Format = Format {
    ext: "webm",
    mime: "video/webm",
    families: &[Family::Video, Family::Audio],
};

/// Every stored format, to serve a stored file by its extension.
const FORMATS: &[Format] = &[
    PNG, JPEG, GIF, WEBP, WAV, MP3, AAC, FLAC, AMR, M4A, OGG, MP4, MOV, WEBM,
];

/// Extensions a client may name, and the family each promises.
fn family_of_ext(ext: &str) -> Option<Family> {
    Some(match ext {
        "png" | "jpg" | "jpeg" | "gif" | "webp" => Family::Image,
        "mp3" | "wav" | "ogg" | "oga" | "opus" | "m4a" | "aac" | "amr" | "flac" => Family::Audio,
        "mp4" | "m4v" | "mov" | "webm" | "ogv" => Family::Video,
        _ => return None,
    })
}

/// What the first bytes say the file is.
fn sniff(b: &[u8]) -> Option<Format> {
    let at = |i: usize, m: &[u8]| b.len() >= i + m.len() && &b[i..i + m.len()] == m;
    if at(0, b"\x89PNG\r\n\x1a\n") {
        Some(PNG)
    } else if at(0, b"\xff\xd8\xff") {
        Some(JPEG)
    } else if at(0, b"GIF87a") || at(0, b"GIF89a") {
        Some(GIF)
    } else if at(0, b"RIFF") && at(8, b"WEBP") {
        Some(WEBP)
    } else if at(0, b"RIFF") && at(8, b"WAVE") {
        Some(WAV)
    } else if at(0, b"ID3") {
        Some(MP3)
    } else if at(0, b"fLaC") {
        Some(FLAC)
    } else if at(0, b"#!AMR") {
        Some(AMR)
    } else if at(0, b"OggS") {
        Some(OGG)
    } else if at(0, b"\x1a\x45\xdf\xa3") {
        Some(WEBM)
    } else if at(4, b"ftyp") {
        if at(8, b"M4A ") || at(8, b"M4B ") {
            Some(M4A)
        } else if at(8, b"qt  ") {
            Some(MOV)
        } else {
            Some(MP4)
        }
    } else if b.len() >= 2 && b[0] == 0xff && (b[1] & 0xf6) == 0xf0 {
        // ADTS: sync word, layer 00.
        Some(AAC)
    } else if b.len() >= 2 && b[0] == 0xff && (b[1] & 0xe0) == 0xe0 {
        // MPEG audio frame sync (an MP3 without an ID3 tag).
        Some(MP3)
    } else {
        None
    }
}

/// Our stored names: 32 lowercase hex digits, a dot, a known extension.
pub fn valid_stored_name(name: &str) -> bool {
    match name.split_once('.') {
        Some((stem, ext)) => {
            stem.len() == 32
                && stem
                    .bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
                && FORMATS.iter().any(|f| f.ext == ext)
        }
        None => false,
    }
}

/// The extension a client named: `filetype` (".mp3" or "mp3") wins, else
/// the file name's, taking only what follows the last `/`, `\` or `.`.
fn client_ext(filetype: Option<&str>, filename: Option<&str>) -> Result<String, ApiError> {
    let raw = match filetype.map(str::trim).filter(|t| !t.is_empty()) {
        Some(t) => t.trim_start_matches('.').to_string(),
        None => {
            let name = filename.unwrap_or("");
            let base = name.rsplit(['/', '\\']).next().unwrap_or("");
            match base.rsplit_once('.') {
                Some((_, ext)) => ext.to_string(),
                None => String::new(),
            }
        }
    };
    let ext = raw.to_ascii_lowercase();
    if ext.is_empty() {
        return Err(ApiError::UnsupportedType(
            "name the file type: a file name with an extension, or filetype=.png".into(),
        ));
    }
    if ext.len() > 8
        || !ext.bytes().all(|c| c.is_ascii_alphanumeric())
        || family_of_ext(&ext).is_none()
    {
        return Err(ApiError::UnsupportedType(format!(
            "file type {:?} is not allowed: images (png, jpg, gif, webp), audio (mp3, wav, ogg, m4a, aac, amr, flac) or video (mp4, mov, webm) only",
            ext.chars().take(16).collect::<String>()
        )));
    }
    Ok(ext)
}

/// Decides how a file is stored: its real format, if it matches what the
/// client said it is.
fn classify(ext: &str, head: &[u8]) -> Result<Format, ApiError> {
    let family = family_of_ext(ext)
        .ok_or_else(|| ApiError::UnsupportedType(format!("file type {ext} is not allowed")))?;
    match sniff(head) {
        Some(f) if f.families.contains(&family) => Ok(f),
        Some(f) => Err(ApiError::UnsupportedType(format!(
            "the file is {} but was named .{ext}",
            f.mime
        ))),
        None => Err(ApiError::UnsupportedType(format!(
            "the file's content is not a known {} format",
            match family {
                Family::Image => "image",
                Family::Audio => "audio",
                Family::Video => "video",
            }
        ))),
    }
}

/// The upload routes, with their own body limit (the file plus a little
/// room for the form's other parts).
pub fn routes(app: &Arc<App>) -> Router<Arc<App>> {
    Router::new()
        .route("/attach/upload", post(upload))
        .route("/attach/files/{name}", get(serve))
        .layer(DefaultBodyLimit::max(
            app.im.cfg().max_upload_bytes + 64 * 1024,
        ))
}

#[tracing::instrument(name = "http.upload", skip_all, fields(uid))]
async fn upload(
    State(app): State<Arc<App>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> ImResult<String> {
    Ok(ImReply::data(
        do_upload(&app, &query, &headers, multipart).await?,
    ))
}

async fn do_upload(
    app: &App,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<String, ApiError> {
    let max = app.im.cfg().max_upload_bytes;
    let too_large = || ApiError::TooLarge(format!("the file is larger than {max} bytes"));
    // Refuse a body announced too large before reading any of it.
    let announced = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if announced.is_some_and(|n| n > max + 64 * 1024) {
        return Err(too_large());
    }
    let mut multipart = multipart.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::BadBody("send multipart/form-data with a `file` part".into())
        }
    })?;
    let mut fields: HashMap<String, String> = HashMap::new();
    let mut file: Option<(Option<String>, Vec<u8>)> = None;
    let field_err = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::BadBody(format!("malformed multipart body: {}", e.body_text()))
        }
    };
    while let Some(mut field) = multipart.next_field().await.map_err(field_err)? {
        let name = field.name().unwrap_or("").to_string();
        if name == "file" {
            if file.is_some() {
                return Err(ApiError::Invalid("send one file per upload".into()));
            }
            let filename = field.file_name().map(str::to_string);
            let mut data = Vec::new();
            while let Some(chunk) = field.chunk().await.map_err(field_err)? {
                if data.len() + chunk.len() > max {
                    return Err(too_large());
                }
                data.extend_from_slice(&chunk);
            }
            file = Some((filename, data));
        } else if matches!(name.as_str(), "filetype" | "token" | "userid") {
            let mut text = Vec::new();
            while let Some(chunk) = field.chunk().await.map_err(field_err)? {
                if text.len() + chunk.len() > 4096 {
                    return Err(ApiError::Invalid(format!("{name} is too long")));
                }
                text.extend_from_slice(&chunk);
            }
            fields.insert(name, String::from_utf8_lossy(&text).into_owned());
        }
        // Other parts are ignored (and drained by the next next_field).
    }
    // Query fields count too (the seed's pages put the token there).
    for (k, v) in query {
        fields.entry(k.clone()).or_insert_with(|| v.clone());
    }
    let uid = im_user(
        app,
        headers,
        fields.get("token").map(String::as_str),
        fields.get("userid").map(String::as_str),
    )?;
    Span::current().record("uid", uid);
    let (filename, data) =
        file.ok_or_else(|| ApiError::Invalid("the `file` part is missing".into()))?;
    if data.is_empty() {
        return Err(ApiError::Invalid("the file is empty".into()));
    }
    let ext = client_ext(
        fields.get("filetype").map(String::as_str),
        filename.as_deref(),
    )?;
    let format = classify(&ext, &data[..data.len().min(64)])?;
    let name = format!("{:032x}.{}", rand::random::<u128>(), format.ext);
    let dir = PathBuf::from(&app.im.cfg().upload_dir);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| ApiError::Internal(format!("create {}: {e}", dir.display())))?;
    let path = dir.join(&name);
    tokio::fs::write(&path, &data)
        .await
        .map_err(|e| ApiError::Internal(format!("write {}: {e}", path.display())))?;
    info!(name = %name, bytes = data.len(), mime = format.mime, "file uploaded");
    Ok(format!("{}{name}", app.im.cfg().upload_url))
}

#[tracing::instrument(name = "http.file", skip_all)]
async fn serve(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    let not_found = || ImError(ApiError::NotFound).into_response();
    if !valid_stored_name(&name) {
        return not_found();
    }
    let Some(format) = name
        .rsplit_once('.')
        .and_then(|(_, ext)| FORMATS.iter().find(|f| f.ext == ext))
    else {
        return not_found();
    };
    match tokio::fs::read(PathBuf::from(&app.im.cfg().upload_dir).join(&name)).await {
        Ok(bytes) => (
            [
                (CONTENT_TYPE, format.mime),
                (X_CONTENT_TYPE_OPTIONS, "nosniff"),
                (CONTENT_SECURITY_POLICY, "default-src 'none'; sandbox"),
                (CACHE_CONTROL, "public, max-age=31536000, immutable"),
            ],
            Body::from(bytes),
        )
            .into_response(),
        Err(_) => not_found(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n...."), Some(PNG));
        assert_eq!(sniff(b"\xff\xd8\xff\xe0"), Some(JPEG));
        assert_eq!(sniff(b"GIF89a.."), Some(GIF));
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 "), Some(WEBP));
        assert_eq!(sniff(b"RIFF\0\0\0\0WAVEfmt "), Some(WAV));
        assert_eq!(sniff(b"ID3\x04"), Some(MP3));
        assert_eq!(sniff(b"\xff\xfb\x90"), Some(MP3));
        assert_eq!(sniff(b"\xff\xf1\x50"), Some(AAC));
        assert_eq!(sniff(b"OggS\0"), Some(OGG));
        assert_eq!(sniff(b"\x1a\x45\xdf\xa3\x01"), Some(WEBM));
        assert_eq!(sniff(b"\0\0\0\x20ftypisom"), Some(MP4));
        assert_eq!(sniff(b"\0\0\0\x20ftypM4A "), Some(M4A));
        assert_eq!(sniff(b"<svg xmlns=..."), None);
        assert_eq!(sniff(b"<html>"), None);
        assert_eq!(sniff(b"hello"), None);
        assert_eq!(sniff(b""), None);
    }

    #[test]
    fn extension_and_content_must_agree() {
        assert_eq!(
            classify("png", b"\x89PNG\r\n\x1a\n").map(|f| f.ext).ok(),
            Some("png")
        );
        assert_eq!(
            classify("png", b"\xff\xd8\xff").map(|f| f.ext).ok(),
            Some("jpg")
        );
        // The seed's recorder sends webm audio named .mp3.
        assert_eq!(
            classify("mp3", b"\x1a\x45\xdf\xa3").map(|f| f.ext).ok(),
            Some("webm")
        );
        assert!(classify("png", b"just text").is_err());
        assert!(classify("png", b"ID3\x04").is_err(), "audio named .png");
        assert!(classify("mp3", b"\x89PNG\r\n\x1a\n").is_err());
    }

    #[test]
    fn client_extensions() {
        assert_eq!(
            client_ext(Some(".mp3"), Some("blob")).ok().as_deref(),
            Some("mp3")
        );
        assert_eq!(
            client_ext(None, Some("a/b\\c.JPG")).ok().as_deref(),
            Some("jpg")
        );
        assert_eq!(
            client_ext(None, Some("../../etc/x.png")).ok().as_deref(),
            Some("png")
        );
        for bad in ["x.html", "x.svg", "x", "x.png/..", "x.php\0.png.", "x.sh"] {
            assert!(client_ext(None, Some(bad)).is_err(), "{bad:?}");
        }
        assert!(client_ext(Some("../png"), None).is_err());
    }

    #[test]
    fn stored_names() {
        assert!(valid_stored_name("0123456789abcdef0123456789abcdef.png"));
        for bad in [
            "0123456789abcdef0123456789abcdef.html",
            "0123456789ABCDEF0123456789abcdef.png",
            "../0123456789abcdef0123456789abcd.png",
            "0123456789abcdef0123456789abcdef.png.png",
            "x.png",
            "",
        ] {
            assert!(!valid_stored_name(bad), "{bad}");
        }
    }
}
