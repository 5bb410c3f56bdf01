//! XDR (RFC 4506), the encoding of libvirt's RPC: big-endian 4-byte units, variable-length
//! data prefixed with its length and padded to 4 bytes. Decoding takes the bytes the daemon
//! sent as untrusted: every length is checked against its limit and against what is left, so
//! truncated or hostile input is an error, never a panic or a huge allocation.

/// What is wrong with bytes that were to be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XdrError {
    #[error("truncated: {what} needs {needed} bytes, {left} are left")]
    Truncated { what: &'static str, needed: usize, left: usize },
    #[error("{what} of {len} exceeds its limit of {max}")]
    TooLong { what: &'static str, len: u32, max: u32 },
    #[error("{what} is not valid UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("{what} has the unknown value {value}")]
    BadValue { what: &'static str, value: i64 },
}

/// libvirt's limit on one string (`REMOTE_STRING_MAX`).
pub const STRING_MAX: u32 = 1_048_576;

#[derive(Debug, Default)]
pub struct Encoder {
    buf: Vec<u8>,
    /// A string held a NUL, which libvirt's C side would cut the string at.
    nul: bool,
}

impl Encoder {
    pub fn new() -> Self {
        Encoder::default()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    pub fn has_nul(&self) -> bool {
        self.nul
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Fixed-length opaque data: the bytes and their padding, no length.
    pub fn fixed(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self.buf.resize(self.buf.len() + pad(bytes.len()), 0);
        self
    }

    /// Variable-length opaque data. Callers pass what the agent made (names, XML, keys), far
    /// below the 4 GiB a length can say; the daemon enforces its own limits.
    pub fn opaque(&mut self, bytes: &[u8]) -> &mut Self {
        self.u32(bytes.len() as u32).fixed(bytes)
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.nul |= s.contains('\0');
        self.opaque(s.as_bytes())
    }

    /// An optional string (`remote_string`): a present flag, then the string.
    pub fn opt_str(&mut self, s: Option<&str>) -> &mut Self {
        match s {
            None => self.u32(0),
            Some(s) => self.u32(1).str(s),
        }
    }
}

fn pad(len: usize) -> usize {
    (4 - len % 4) % 4
}

pub struct Decoder<'a> {
    bytes: &'a [u8],
}

impl<'a> Decoder<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Decoder { bytes }
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }

    fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], XdrError> {
        if n > self.bytes.len() {
            return Err(XdrError::Truncated { what, needed: n, left: self.bytes.len() });
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, XdrError> {
        let b = self.take(what, 4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn i32(&mut self, what: &'static str) -> Result<i32, XdrError> {
        Ok(self.u32(what)? as i32)
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, XdrError> {
        let b = self.take(what, 8)?;
        let mut a = [0; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// Fixed-length opaque data of `N` bytes (and its padding).
    pub fn fixed<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], XdrError> {
        let b = self.take(what, N + pad(N))?;
        let mut a = [0; N];
        a.copy_from_slice(&b[..N]);
        Ok(a)
    }

    /// Variable-length opaque data of at most `max` bytes.
    pub fn opaque(&mut self, what: &'static str, max: u32) -> Result<Vec<u8>, XdrError> {
        let len = self.u32(what)?;
        if len > max {
            return Err(XdrError::TooLong { what, len, max });
        }
        let len = len as usize;
        let b = self.take(what, len + pad(len))?;
        Ok(b[..len].to_vec())
    }

    /// A string of at most [`STRING_MAX`] bytes.
    pub fn string(&mut self, what: &'static str) -> Result<String, XdrError> {
        String::from_utf8(self.opaque(what, STRING_MAX)?).map_err(|_| XdrError::NotUtf8 { what })
    }

    /// An optional value: a present flag (0 or 1), then the value.
    pub fn optional<T>(
        &mut self,
        what: &'static str,
        item: impl FnOnce(&mut Self) -> Result<T, XdrError>,
    ) -> Result<Option<T>, XdrError> {
        match self.u32(what)? {
            0 => Ok(None),
            1 => item(self).map(Some),
            v => Err(XdrError::BadValue { what, value: v.into() }),
        }
    }

    /// A variable-length array of at most `max` items. The count is also checked against the
    /// bytes left (every item takes at least 4), so a huge count allocates nothing.
    pub fn array<T>(
        &mut self,
        what: &'static str,
        max: u32,
        mut item: impl FnMut(&mut Self) -> Result<T, XdrError>,
    ) -> Result<Vec<T>, XdrError> {
        let len = self.u32(what)?;
        if len > max {
            return Err(XdrError::TooLong { what, len, max });
        }
        let needed = len as usize * 4;
        if needed > self.bytes.len() {
            return Err(XdrError::Truncated { what, needed, left: self.bytes.len() });
        }
        (0..len).map(|_| item(self)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_with_padding() {
        let mut e = Encoder::new();
        e.u32(7).i32(-2).u64(1 << 40).str("abcde").opt_str(None).opt_str(Some("x")).fixed(&[9; 16]);
        let bytes = e.into_bytes();
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(&bytes[16..28], &[0, 0, 0, 5, b'a', b'b', b'c', b'd', b'e', 0, 0, 0], "length, bytes, padding");
        let mut d = Decoder::new(&bytes);
        assert_eq!(d.u32("a").unwrap(), 7);
        assert_eq!(d.i32("b").unwrap(), -2);
        assert_eq!(d.u64("c").unwrap(), 1 << 40);
        assert_eq!(d.string("d").unwrap(), "abcde");
        assert_eq!(d.optional("e", |d| d.string("e")).unwrap(), None);
        assert_eq!(d.optional("f", |d| d.string("f")).unwrap().as_deref(), Some("x"));
        assert_eq!(d.fixed::<16>("g").unwrap(), [9; 16]);
        assert_eq!(d.remaining(), 0);
    }

    #[test]
    fn truncated_input_is_an_error_at_every_cut() {
        let mut e = Encoder::new();
        e.u64(5).str("hello world").opt_str(Some("y"));
        let bytes = e.into_bytes();
        for cut in 0..bytes.len() {
            let mut d = Decoder::new(&bytes[..cut]);
            let r = d.u64("n").and_then(|_| d.string("s")).and_then(|_| d.optional("o", |d| d.string("o")));
            assert!(matches!(r, Err(XdrError::Truncated { .. })), "cut at {cut}: {r:?}");
        }
    }

    #[test]
    fn lengths_over_their_limit_are_refused_before_allocating() {
        let huge = u32::MAX.to_be_bytes();
        assert!(matches!(Decoder::new(&huge).string("s"), Err(XdrError::TooLong { .. })));
        assert!(matches!(Decoder::new(&huge).opaque("o", 16), Err(XdrError::TooLong { .. })));
        assert!(matches!(Decoder::new(&huge).array("a", u32::MAX, |d| d.u32("i")), Err(XdrError::Truncated { .. })));
        let many = 1000u32.to_be_bytes();
        assert!(matches!(Decoder::new(&many).array("a", 16, |d| d.u32("i")), Err(XdrError::TooLong { .. })));
    }

    #[test]
    fn bad_flags_and_bytes_are_errors() {
        assert!(matches!(Decoder::new(&[0, 0, 0, 2]).optional("o", |d| d.u32("v")), Err(XdrError::BadValue { .. })));
        let mut e = Encoder::new();
        e.opaque(&[0xff, 0xfe]);
        assert_eq!(Decoder::new(&e.into_bytes()).string("s"), Err(XdrError::NotUtf8 { what: "s" }));
    }
}
