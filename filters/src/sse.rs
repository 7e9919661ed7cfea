//! Server-sent events: splitting a byte stream into complete events whatever the chunking, and
//! reading an event's `event:` and `data:` fields.

/// Splits an SSE byte stream into complete events (each with its blank-line terminator),
/// holding back only a trailing partial event.
#[derive(Debug, Default)]
pub struct SseSplitter {
    pending: Vec<u8>,
}

impl SseSplitter {
    /// Calls `on_event` for every event completed by `chunk`.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(&[u8])) {
        if self.pending.is_empty() {
            let consumed = split(chunk, &mut on_event);
            self.pending.extend_from_slice(&chunk[consumed..]);
        } else {
            let mut data = std::mem::take(&mut self.pending);
            data.extend_from_slice(chunk);
            let consumed = split(&data, &mut on_event);
            data.drain(..consumed);
            self.pending = data;
        }
    }

    /// Hands over a final event that lacked its terminator.
    pub fn finish(&mut self, mut on_event: impl FnMut(&[u8])) {
        let rest = std::mem::take(&mut self.pending);
        if !rest.iter().all(u8::is_ascii_whitespace) {
            on_event(&rest);
        }
    }
}

fn split(data: &[u8], on_event: &mut impl FnMut(&[u8])) -> usize {
    let mut start = 0;
    while let Some(end) = event_end(&data[start..]) {
        on_event(&data[start..start + end]);
        start += end;
    }
    start
}

/// Length of the first complete event (including its blank-line terminator), if any: the
/// end of the first `\n\n` or `\r\n\r\n`, whichever ends first. Found from newline to
/// newline: a substring search would set up its searcher for every event.
fn event_end(data: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(at) = memchr::memchr(b'\n', &data[from..]) {
        let i = from + at;
        match data.get(i + 1) {
            Some(b'\n') => return Some(i + 2),
            Some(b'\r') if i > 0 && data[i - 1] == b'\r' && data.get(i + 2) == Some(&b'\n') => {
                return Some(i + 3)
            }
            _ => from = i + 1,
        }
    }
    None
}

fn field<'a>(event: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let mut rest = event;
    loop {
        let newline = memchr::memchr(b'\n', rest);
        let line = &rest[..newline.unwrap_or(rest.len())];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(name) {
            if let Some(rest) = rest.strip_prefix(b":") {
                return Some(rest.strip_prefix(b" ").unwrap_or(rest));
            }
        }
        rest = &rest[newline? + 1..];
    }
}

/// The payload of an event's `data:` line (single-line data is what LLM APIs send).
pub fn event_data(event: &[u8]) -> Option<&[u8]> {
    field(event, b"data")
}

/// The event's `event:` name, if it has one.
pub fn event_name(event: &[u8]) -> Option<&[u8]> {
    field(event, b"event")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_end_is_the_first_blank_line() {
        let reference = |data: &[u8]| {
            let lf = memchr::memmem::find(data, b"\n\n").map(|i| i + 2);
            let crlf = memchr::memmem::find(data, b"\r\n\r\n").map(|i| i + 4);
            match (lf, crlf) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        // Every string of up to 6 bytes over the bytes that matter.
        let alphabet = [b'\n', b'\r', b'a'];
        for len in 0..=6u32 {
            for n in 0..3usize.pow(len) {
                let data: Vec<u8> = (0..len).map(|i| alphabet[n / 3usize.pow(i) % 3]).collect();
                assert_eq!(event_end(&data), reference(&data), "{data:?}");
            }
        }
    }

    #[test]
    fn splits_any_chunking_and_reads_fields() {
        let stream = b"event: a\ndata: {\"x\":1}\n\ndata: 2\r\n\r\n: comment\n\ndata: tail";
        for n in 1..stream.len() {
            let mut s = SseSplitter::default();
            let mut events: Vec<Vec<u8>> = vec![];
            for chunk in stream.chunks(n) {
                s.feed(chunk, |e| events.push(e.to_vec()));
            }
            s.finish(|e| events.push(e.to_vec()));
            assert_eq!(events.len(), 4, "split {n}");
            assert_eq!(event_name(&events[0]), Some(&b"a"[..]));
            assert_eq!(event_data(&events[0]), Some(&b"{\"x\":1}"[..]));
            assert_eq!(event_data(&events[1]), Some(&b"2"[..]));
            assert_eq!(event_data(&events[2]), None);
            assert_eq!(event_data(&events[3]), Some(&b"tail"[..]));
        }
    }
}
