//! What a created verification shows the user: the pre-filled WhatsApp text
//! (`waMessage`, English or Indonesian), the `wa.me` link that opens it
//! (`waLink`) and a QR code of that link (`qrCode`, a base64 PNG). Pure: no
//! I/O, no clock (the caller passes the expiry time).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rand::distr::{Alphanumeric, SampleString as _};
use time::macros::{format_description, offset};
use time::OffsetDateTime;

/// Pixels per QR module: a typical `waLink` (about 480 characters) needs a
/// version-15 code, 77 modules, so the image is 340 px wide with the quiet
/// zone: readable from a screen, a few KiB of PNG.
const QR_SCALE: usize = 4;
/// Light modules around the code, the width the QR standard asks for.
const QR_QUIET_ZONE: usize = 4;
/// Random characters after the id in the verification code, as many as in
/// the documented example (`…:wJMbWyxZprJGuZvz`).
const CODE_NONCE_LEN: usize = 16;

/// The two documented `languageCode` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Language {
    En,
    Id,
}

impl Language {
    pub fn parse(code: &str) -> Option<Self> {
        match code {
            "en" => Some(Language::En),
            "id" => Some(Language::Id),
            _ => None,
        }
    }
}

/// Why a QR image could not be made; neither happens for a link of a sane
/// length, but the encoder's errors are kept rather than hidden.
#[derive(Debug, thiserror::Error)]
pub enum QrError {
    #[error("the link does not fit in a QR code: {0}")]
    Encode(#[from] qrcode::types::QrError),
    #[error("PNG encoding failed: {0}")]
    Png(#[from] png::EncodingError),
}

/// The verification code of the documented example, decoded once by hand:
/// `base64(base64("<id>:<16 random alphanumerics>"))`. Mimicking it lets a
/// client's parser see the same alphabet and length it will see upstream.
pub fn verification_code(id: &uuid::Uuid) -> String {
    let nonce = Alphanumeric.sample_string(&mut rand::rng(), CODE_NONCE_LEN);
    let inner = BASE64.encode(format!("{id}:{nonce}"));
    BASE64.encode(inner)
}

/// The WhatsApp text, line for line the structure of the documented
/// Indonesian example; the English text is its translation. The expiry is
/// shown in Western Indonesia Time (UTC+7), SendTalk's home time zone, in the
/// example's `HH:MM:SS DD-MM-YYYY` format.
pub fn wa_message(language: Language, code: &str, expires_at: OffsetDateTime) -> String {
    let local = expires_at.to_offset(offset!(+7));
    let until = local
        .format(format_description!(
            "[hour]:[minute]:[second] [day]-[month]-[year]"
        ))
        .expect("hour, minute, second, day, month and year always format");
    match language {
        Language::Id => format!(
            "Mohon jangan ubah teks verifikasi ini.\n\n\
             Kode Verifikasi: {code}\n\
             Berlaku sampai dengan: {until}\n\n\
             *Pastikan nomor WhatsApp ini sama dengan nomor yang Anda gunakan.*\n\n\
             Kirim teks ini tanpa mengubah isinya, lalu silakan kembali ke aplikasi."
        ),
        Language::En => format!(
            "Please do not change this verification text.\n\n\
             Verification Code: {code}\n\
             Valid until: {until}\n\n\
             *Make sure this WhatsApp number is the same as the number you are using.*\n\n\
             Send this text without changing it, then please return to the app."
        ),
    }
}

/// `https://wa.me/<number>?text=<waMessage>`, the text escaped as in the
/// documented example.
pub fn wa_link(wa_number: &str, message: &str) -> String {
    format!("https://wa.me/{wa_number}?text={}", query_escape(message))
}

/// Query-component escaping exactly as the documented `waLink` shows it:
/// space as `+`, every byte but `A-Z a-z 0-9 - _ . ~` as `%XX` (upper-case
/// hex). The WHATWG form encoder leaves `*` alone, but the example has `%2A`
/// for the asterisks around the bold line, so it cannot be used here.
pub fn query_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3 / 2);
    for &b in text.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b));
            }
            b' ' => out.push('+'),
            _ => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0x0F)]));
            }
        }
    }
    out
}

/// A QR code of `link` as a grey-scale PNG, base64-encoded (no `data:`
/// prefix: the documented field is elided, and a bare base64 string is what
/// "PNG, base64" says; a client adds the prefix to show it in a browser).
pub fn qr_png_base64(link: &str) -> Result<String, QrError> {
    let code = qrcode::QrCode::new(link.as_bytes())?;
    let modules = code.width();
    let colors = code.to_colors();
    let side = (modules + 2 * QR_QUIET_ZONE) * QR_SCALE;
    // White everywhere, then each dark module painted as a QR_SCALE square.
    let mut pixels = vec![0xFF_u8; side * side];
    for (i, color) in colors.iter().enumerate() {
        if *color != qrcode::Color::Dark {
            continue;
        }
        let (mx, my) = (i % modules, i / modules);
        for dy in 0..QR_SCALE {
            let row = (my + QR_QUIET_ZONE) * QR_SCALE + dy;
            let start = row * side + (mx + QR_QUIET_ZONE) * QR_SCALE;
            pixels[start..start + QR_SCALE].fill(0x00);
        }
    }
    let side_u32 = u32::try_from(side).expect("a QR code is at most 185 modules wide");
    let mut png_bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut png_bytes, side_u32, side_u32);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&pixels)?;
        writer.finish()?;
    }
    Ok(BASE64.encode(png_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented example's `waMessage` and `waLink` (shared/fixtures).
    const DOC_MESSAGE: &str = "Mohon jangan ubah teks verifikasi ini.\n\nKode Verifikasi: TTJZek5XVmpNRGN0TnpkbU1TMDBabUV3TFRrME1UWXRPR1ZtTURFNVpUVXlNVGc1T25kS1RXSlhlWGhhY0hKS1IzVmFkbm89\nBerlaku sampai dengan: 16:09:00 19-06-2023\n\n*Pastikan nomor WhatsApp ini sama dengan nomor yang Anda gunakan.*\n\nKirim teks ini tanpa mengubah isinya, lalu silakan kembali ke aplikasi.";
    const DOC_LINK: &str = "https://wa.me/6281212345678?text=Mohon+jangan+ubah+teks+verifikasi+ini.%0A%0AKode+Verifikasi%3A+TTJZek5XVmpNRGN0TnpkbU1TMDBabUV3TFRrME1UWXRPR1ZtTURFNVpUVXlNVGc1T25kS1RXSlhlWGhhY0hKS1IzVmFkbm89%0ABerlaku+sampai+dengan%3A+16%3A09%3A00+19-06-2023%0A%0A%2APastikan+nomor+WhatsApp+ini+sama+dengan+nomor+yang+Anda+gunakan.%2A%0A%0AKirim+teks+ini+tanpa+mengubah+isinya%2C+lalu+silakan+kembali+ke+aplikasi.";
    const DOC_CODE: &str = "TTJZek5XVmpNRGN0TnpkbU1TMDBabUV3TFRrME1UWXRPR1ZtTURFNVpUVXlNVGc1T25kS1RXSlhlWGhhY0hKS1IzVmFkbm89";

    #[test]
    fn escaping_reproduces_the_documented_link() {
        assert_eq!(wa_link("6281212345678", DOC_MESSAGE), DOC_LINK);
    }

    #[test]
    fn the_indonesian_text_reproduces_the_documented_message() {
        // 16:09:00 in UTC+7 is 09:09:00 UTC.
        let expiry = time::macros::datetime!(2023-06-19 09:09:00 UTC);
        assert_eq!(wa_message(Language::Id, DOC_CODE, expiry), DOC_MESSAGE);
    }

    #[test]
    fn the_code_wraps_the_id_twice_in_base64() {
        let id = uuid::Uuid::new_v4();
        let code = verification_code(&id);
        let inner = BASE64.decode(&code).unwrap();
        let plain = String::from_utf8(BASE64.decode(inner).unwrap()).unwrap();
        let (got_id, nonce) = plain.split_once(':').unwrap();
        assert_eq!(got_id, id.to_string());
        assert_eq!(nonce.len(), CODE_NONCE_LEN);
        assert_eq!(code.len(), DOC_CODE.len());
    }

    #[test]
    fn the_qr_code_is_a_png() {
        let png = BASE64.decode(qr_png_base64(DOC_LINK).unwrap()).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
}
