//! TLS ClientHello parser: owns turning the first bytes a client sends on a
//! TLS port into the routing facts portcullis needs (SNI host name, ALPN
//! protocols, whether ECH is offered) or a precise rejection.
//!
//! It must not do I/O, allocate beyond the bounded hello, terminate TLS, or
//! invent a server name: no SNI means `server_name: None` and the caller
//! decides. It is incremental: any prefix of a valid hello is `NeedMore`.
// Untrusted bytes: no indexing or panics, even where clippy would allow them.
#![deny(clippy::indexing_slicing, clippy::panic, clippy::expect_used)]

use std::borrow::Cow;

/// Largest ClientHello handshake message (body, without the 4-byte header)
/// we accept. Real hellos (even with post-quantum key shares) are well below.
pub const MAX_HELLO_BYTES: usize = 64 * 1024;
/// Most TLS records the hello may be fragmented across before we give up.
pub const MAX_RECORDS: usize = 300;

/// RFC 8446 §5.1: record header is type(1) version(2) length(2).
const RECORD_HEADER_LEN: usize = 5;
/// RFC 8446 §5.1 caps plaintext fragments at 2^14; allow slack for odd peers.
const MAX_RECORD_LEN: usize = 16384 + 2048;
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
/// RFC 8446 §4: msg_type(1) length(3).
const HANDSHAKE_HEADER_LEN: usize = 4;
const HANDSHAKE_TYPE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;
const NAME_TYPE_HOST_NAME: u8 = 0;
/// RFC 1035 §2.3.4 limits, applied to the name without its trailing dot.
const MAX_HOST_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// What a complete, well-formed ClientHello tells us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// Lowercased host name without trailing dot; `None` if no SNI was sent.
    pub server_name: Option<String>,
    /// ALPN protocol names in client preference order (empty if absent).
    pub alpn: Alpn,
    /// The client offered Encrypted Client Hello (ext 0xfe0d), so
    /// `server_name` is only the ECH public name.
    pub ech: bool,
    /// Bytes of `buf` taken by the records that carried the hello.
    pub consumed: usize,
    /// The `legacy_record_version` of the first record (0x0301..=0x0304): the version an
    /// alert refusing this hello is framed with.
    pub record_version: u16,
}

/// Outcome of looking at the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    Done(ClientHello),
    /// The bytes so far are a valid prefix; read more and call again.
    NeedMore,
    Reject(Reject),
}

/// Why the bytes can never become an acceptable ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// A record other than handshake (22) before the hello completed.
    NotHandshake,
    /// The first handshake message is not a ClientHello.
    NotClientHello,
    /// SSLv2-compatible hello (high bit set in the first byte).
    Sslv2,
    /// Handshake length above [`MAX_HELLO_BYTES`].
    TooLarge,
    /// More than [`MAX_RECORDS`] records needed.
    TooManyRecords,
    Malformed,
    /// Two server_name extensions.
    DuplicateServerName,
    /// More than one entry in the server_name list.
    MultipleNames,
    InvalidName,
    EmptyName,
    /// Record or hello version outside TLS 1.0..=1.3 framing.
    UnsupportedVersion,
}

/// Parses the start of a client's byte stream as a ClientHello.
///
/// `buf` must hold every byte received from the start of the connection.
pub fn parse_client_hello(buf: &[u8]) -> Parse {
    match reassemble(buf) {
        Ok(Some((message, consumed))) => {
            let body = message.get(HANDSHAKE_HEADER_LEN..).unwrap_or_default();
            match parse_body(body) {
                Ok(hello) => Parse::Done(ClientHello {
                    consumed,
                    // `reassemble` checked the first record's header: all five bytes are here.
                    record_version: match buf {
                        [_, major, minor, ..] => u16::from_be_bytes([*major, *minor]),
                        _ => 0x0303,
                    },
                    ..hello
                }),
                Err(reject) => Parse::Reject(reject),
            }
        }
        Ok(None) => Parse::NeedMore,
        Err(reject) => Parse::Reject(reject),
    }
}

/// The ClientHello handshake message, header included (borrowed from the records when it
/// fits one), and the bytes its records took.
type Reassembled<'a> = (Cow<'a, [u8]>, usize);

/// Collects the handshake message body from the record layer.
///
/// Returns `Ok(None)` when more bytes are needed, otherwise the ClientHello
/// message and how many bytes of `buf` its records used. Every rejection here
/// depends only on bytes already present, so a longer `buf` can never turn a
/// rejection into success (and vice versa).
fn reassemble(buf: &[u8]) -> Result<Option<Reassembled<'_>>, Reject> {
    // The hello is almost always one record: its body is then borrowed from `buf`, and
    // only a hello spread over several records is copied together.
    let mut handshake: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    // Sum of declared record lengths so far: lets us see a record that runs
    // past the hello before its bytes arrive.
    let mut declared_handshake_bytes: usize = 0;
    let mut record_start: usize = 0;
    let mut records: usize = 0;
    loop {
        if records == MAX_RECORDS {
            return Err(Reject::TooManyRecords);
        }
        let header = buf.get(record_start..).unwrap_or_default();
        let header = header.get(..RECORD_HEADER_LEN).unwrap_or(header);
        let Some(record_len) = check_record_header(header, records == 0)? else {
            return Ok(None);
        };
        records += 1;
        let fragment_start = record_start
            .checked_add(RECORD_HEADER_LEN)
            .ok_or(Reject::Malformed)?;
        let record_end = fragment_start
            .checked_add(record_len)
            .ok_or(Reject::Malformed)?;
        let available_end = record_end.min(buf.len());
        let fragment = buf.get(fragment_start..available_end).unwrap_or_default();
        match &mut handshake {
            Cow::Borrowed(first) if records == 1 => *first = fragment,
            Cow::Borrowed(first) => {
                // A second record: the pieces are joined, in one allocation sized for all.
                let mut joined = Vec::with_capacity(buf.len());
                joined.extend_from_slice(first);
                joined.extend_from_slice(fragment);
                handshake = Cow::Owned(joined);
            }
            Cow::Owned(joined) => joined.extend_from_slice(fragment),
        }
        declared_handshake_bytes = declared_handshake_bytes
            .checked_add(record_len)
            .ok_or(Reject::Malformed)?;

        if let Some(message_len) = check_handshake_header(&handshake)? {
            let total = HANDSHAKE_HEADER_LEN
                .checked_add(message_len)
                .ok_or(Reject::Malformed)?;
            if declared_handshake_bytes >= total {
                // RFC 8446 §5.1: a ClientHello must be followed by the
                // server's reply, so nothing else may share its last record.
                if declared_handshake_bytes != total {
                    return Err(Reject::Malformed);
                }
                if buf.len() < record_end {
                    return Ok(None);
                }
                return Ok(Some((handshake, record_end)));
            }
        }
        if buf.len() < record_end {
            return Ok(None);
        }
        record_start = record_end;
    }
}

/// Checks the (possibly partial) 5-byte record header; returns the fragment
/// length once all five bytes are present.
fn check_record_header(header: &[u8], first_record: bool) -> Result<Option<usize>, Reject> {
    let Some(&content_type) = header.first() else {
        return Ok(None);
    };
    // SSLv2 CLIENT-HELLO starts with a 2-byte length whose high bit is set
    // (RFC 6101 Appendix E.2); no TLS content type has that bit.
    if first_record && content_type & 0x80 != 0 {
        return Err(Reject::Sslv2);
    }
    if content_type != CONTENT_TYPE_HANDSHAKE {
        return Err(Reject::NotHandshake);
    }
    // RFC 8446 §5.1 legacy_record_version: 0x0301 is common, up to 0x0304
    // tolerated; SSL 3.0 (0x0300) and anything else is refused.
    if let Some(&major) = header.get(1)
        && major != 3
    {
        return Err(Reject::UnsupportedVersion);
    }
    if let Some(&minor) = header.get(2)
        && !(1..=4).contains(&minor)
    {
        return Err(Reject::UnsupportedVersion);
    }
    let (Some(&high), Some(&low)) = (header.get(3), header.get(4)) else {
        return Ok(None);
    };
    let length = usize::from(u16::from_be_bytes([high, low]));
    // RFC 8446 §5.1: zero-length handshake fragments MUST NOT be sent.
    if length == 0 || length > MAX_RECORD_LEN {
        return Err(Reject::Malformed);
    }
    Ok(Some(length))
}

/// Checks the (possibly partial) handshake header; returns the body length
/// once all four bytes are present.
fn check_handshake_header(handshake: &[u8]) -> Result<Option<usize>, Reject> {
    let Some(&message_type) = handshake.first() else {
        return Ok(None);
    };
    if message_type != HANDSHAKE_TYPE_CLIENT_HELLO {
        return Err(Reject::NotClientHello);
    }
    let (Some(&b1), Some(&b2), Some(&b3)) = (handshake.get(1), handshake.get(2), handshake.get(3))
    else {
        return Ok(None);
    };
    let length = usize::from(b1) << 16 | usize::from(b2) << 8 | usize::from(b3);
    if length > MAX_HELLO_BYTES {
        return Err(Reject::TooLarge);
    }
    Ok(Some(length))
}

/// Bounds-checked big-endian reader over untrusted bytes.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8], Reject> {
        let (taken, rest) = self.rest.split_at_checked(count).ok_or(Reject::Malformed)?;
        self.rest = rest;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, Reject> {
        self.take(1)?.first().copied().ok_or(Reject::Malformed)
    }

    fn u16(&mut self) -> Result<u16, Reject> {
        let bytes = self.take(2)?;
        match bytes {
            [high, low] => Ok(u16::from_be_bytes([*high, *low])),
            _ => Err(Reject::Malformed),
        }
    }

    /// `opaque x<0..2^8-1>`
    fn vec_u8(&mut self) -> Result<&'a [u8], Reject> {
        let length = self.u8()?;
        self.take(usize::from(length))
    }

    /// `opaque x<0..2^16-1>`
    fn vec_u16(&mut self) -> Result<&'a [u8], Reject> {
        let length = self.u16()?;
        self.take(usize::from(length))
    }
}

/// Parses a ClientHello body (RFC 8446 §4.1.2; RFC 5246 §7.4.1.2 for the
/// optional extensions block of older clients).
fn parse_body(body: &[u8]) -> Result<ClientHello, Reject> {
    let mut reader = Reader::new(body);
    let legacy_version = reader.u16()?;
    // TLS 1.3 pins legacy_version to 0x0303, but RFC 8446 §D.1 expects
    // servers to tolerate higher values; below TLS 1.0 is refused.
    if !(0x0301..=0x03ff).contains(&legacy_version) {
        return Err(Reject::UnsupportedVersion);
    }
    reader.take(32)?; // random
    let session_id = reader.vec_u8()?;
    if session_id.len() > 32 {
        return Err(Reject::Malformed);
    }
    let cipher_suites = reader.vec_u16()?;
    if cipher_suites.is_empty() || cipher_suites.len() % 2 != 0 {
        return Err(Reject::Malformed);
    }
    let compression_methods = reader.vec_u8()?;
    if compression_methods.is_empty() {
        return Err(Reject::Malformed);
    }
    let mut hello = ClientHello {
        server_name: None,
        alpn: Alpn::default(),
        ech: false,
        consumed: 0,
        record_version: 0x0303,
    };
    if reader.is_empty() {
        return Ok(hello); // pre-TLS-1.2 client without extensions
    }
    let mut extensions = Reader::new(reader.vec_u16()?);
    if !reader.is_empty() {
        return Err(Reject::Malformed);
    }
    let mut seen_types = SeenExtensionTypes::new();
    while !extensions.is_empty() {
        let extension_type = extensions.u16()?;
        let data = extensions.vec_u16()?;
        // RFC 8446 §4.2: no extension type may appear twice.
        if !seen_types.insert(extension_type) {
            return Err(if extension_type == EXT_SERVER_NAME {
                Reject::DuplicateServerName
            } else {
                Reject::Malformed
            });
        }
        match extension_type {
            EXT_SERVER_NAME => hello.server_name = Some(parse_server_name(data)?),
            EXT_ALPN => hello.alpn = parse_alpn(data)?,
            EXT_ENCRYPTED_CLIENT_HELLO => hello.ech = true,
            _ => {}
        }
    }
    Ok(hello)
}

/// The extension types seen so far. The types below 64 (nearly all a real hello carries)
/// are one bit each in a word; the others (GREASE, `renegotiation_info`, ECH) are kept in a
/// small array and searched (no 8 KiB to clear per hello). A hello with more spills into
/// one bit per possible type, so even a hostile hello with thousands of extensions costs
/// O(1) per check. (Searching the array for every type was about 750 instructions a hello.)
struct SeenExtensionTypes {
    low: u64,
    few: [u16; FEW_EXTENSIONS],
    count: usize,
    many: Option<Box<[u64; (u16::MAX as usize + 1) / 64]>>,
}

/// Extension types of 64 and above kept in [`SeenExtensionTypes`]' array before it spills.
const FEW_EXTENSIONS: usize = 48;

impl SeenExtensionTypes {
    fn new() -> Self {
        Self {
            low: 0,
            few: [0; FEW_EXTENSIONS],
            count: 0,
            many: None,
        }
    }

    /// Returns false if the type was already seen.
    fn insert(&mut self, extension_type: u16) -> bool {
        if extension_type < 64 {
            return mark(std::slice::from_mut(&mut self.low), extension_type);
        }
        if let Some(bits) = &mut self.many {
            return mark(&mut bits[..], extension_type);
        }
        let seen = self.few.get(..self.count).unwrap_or_default();
        if seen.contains(&extension_type) {
            return false;
        }
        match self.few.get_mut(self.count) {
            Some(slot) => {
                *slot = extension_type;
                self.count += 1;
            }
            None => {
                let mut bits = Box::new([0u64; (u16::MAX as usize + 1) / 64]);
                for &t in self.few.iter().chain(std::iter::once(&extension_type)) {
                    mark(&mut bits[..], t);
                }
                self.many = Some(bits);
            }
        }
        true
    }
}

/// Set `extension_type`'s bit; false if it was already set.
fn mark(bits: &mut [u64], extension_type: u16) -> bool {
    let mask = 1u64 << (extension_type % 64);
    match bits.get_mut(usize::from(extension_type / 64)) {
        Some(word) if *word & mask == 0 => {
            *word |= mask;
            true
        }
        _ => false,
    }
}

/// RFC 6066 §3 server_name extension: exactly one host_name entry.
fn parse_server_name(data: &[u8]) -> Result<String, Reject> {
    let mut reader = Reader::new(data);
    let list = reader.vec_u16()?;
    if !reader.is_empty() || list.is_empty() {
        return Err(Reject::Malformed);
    }
    let mut entries = Reader::new(list);
    let name_type = entries.u8()?;
    let name = entries.vec_u16()?;
    if !entries.is_empty() {
        return Err(Reject::MultipleNames);
    }
    if name_type != NAME_TYPE_HOST_NAME {
        return Err(Reject::InvalidName);
    }
    normalize_host_name(name)
}

/// Validates an SNI host name and returns it lowercased without the
/// trailing dot. RFC 6066 §3: DNS host name, no IP literals.
fn normalize_host_name(name: &[u8]) -> Result<String, Reject> {
    if name.is_empty() {
        return Err(Reject::EmptyName);
    }
    let allowed = |byte: &u8| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.');
    if !name.iter().all(allowed) {
        return Err(Reject::InvalidName);
    }
    let without_root = name.strip_suffix(b".").unwrap_or(name);
    if without_root.len() > MAX_HOST_NAME_LEN {
        return Err(Reject::InvalidName);
    }
    let mut last_label: &[u8] = &[];
    for label in without_root.split(|&byte| byte == b'.') {
        if label.is_empty() || label.len() > MAX_LABEL_LEN {
            return Err(Reject::InvalidName);
        }
        last_label = label;
    }
    // No TLD is all digits, so this catches IPv4 literals in any notation.
    if last_label.iter().all(u8::is_ascii_digit) {
        return Err(Reject::InvalidName);
    }
    let text = std::str::from_utf8(without_root).map_err(|_| Reject::InvalidName)?;
    Ok(text.to_ascii_lowercase())
}

/// RFC 7301 §3.1: `ProtocolName protocol_name_list<2..2^16-1>`, each name
/// `opaque ProtocolName<1..2^8-1>`.
fn parse_alpn(data: &[u8]) -> Result<Alpn, Reject> {
    let mut reader = Reader::new(data);
    let list = reader.vec_u16()?;
    if !reader.is_empty() || list.is_empty() {
        return Err(Reject::Malformed);
    }
    let mut names = Reader::new(list);
    while !names.is_empty() {
        if names.vec_u8()?.is_empty() {
            return Err(Reject::Malformed);
        }
    }
    Ok(Alpn(list.into()))
}

/// ALPN protocol names in client preference order, kept as the hello listed them (each
/// after its length byte, checked by [`parse_alpn`]): one allocation however many names
/// there are, not one per name and one for the list, on every new tunnel.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Alpn(Box<[u8]>);

impl Alpn {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The names, in the client's order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        // The list was checked when parsed: the reader runs out exactly after the last name.
        let mut names = Reader::new(&self.0);
        std::iter::from_fn(move || names.vec_u8().ok())
    }
}

impl PartialEq<Vec<Vec<u8>>> for Alpn {
    fn eq(&self, other: &Vec<Vec<u8>>) -> bool {
        self.iter().eq(other.iter().map(Vec::as_slice))
    }
}

impl std::fmt::Debug for Alpn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.iter().map(String::from_utf8_lossy))
            .finish()
    }
}

#[cfg(test)]
mod tests;
