//! A minimal HTTP/1.1 client for the node's server API (JSON POSTs with
//! `x-api-key`), over one kept-alive connection, reconnecting when the
//! server closes it. Enough for notification bursts; not a general client.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("http {status}: {body}")]
    Status { status: u16, body: String },
}

impl HttpError {
    pub fn cause(&self, what: &str) -> String {
        match self {
            HttpError::Io(e) => format!("{what}: {:?}", e.kind()),
            HttpError::Timeout => format!("{what}: timeout"),
            HttpError::Malformed(_) => format!("{what}: malformed response"),
            HttpError::Status { status, .. } => format!("{what}: http {status}"),
        }
    }
}

/// Largest response accepted, headers and body.
const MAX_RESPONSE: usize = 4 << 20;

pub struct ApiClient {
    addr: SocketAddr,
    api_key: String,
    timeout: Duration,
    conn: Option<TcpStream>,
}

impl ApiClient {
    pub fn new(addr: SocketAddr, api_key: &str, timeout: Duration) -> ApiClient {
        ApiClient {
            addr,
            api_key: api_key.to_string(),
            timeout,
            conn: None,
        }
    }

    /// POSTs `body` as JSON to `path`; returns the response body of a 2xx.
    pub async fn post_json(
        &mut self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Vec<u8>, HttpError> {
        let body = serde_json::to_vec(body).map_err(|e| HttpError::Malformed(e.to_string()))?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nx-api-key: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: keep-alive\r\n\r\n",
            self.addr,
            self.api_key,
            body.len()
        );
        let mut req = head.into_bytes();
        req.extend_from_slice(&body);
        // A kept-alive connection the server closed meanwhile fails at once: retry once on a new one.
        let reused = self.conn.is_some();
        match tokio::time::timeout(self.timeout, self.exchange(&req)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(HttpError::Io(_))) if reused => {
                self.conn = None;
                tokio::time::timeout(self.timeout, self.exchange(&req))
                    .await
                    .map_err(|_| HttpError::Timeout)?
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                self.conn = None;
                Err(HttpError::Timeout)
            }
        }
    }

    async fn exchange(&mut self, req: &[u8]) -> Result<Vec<u8>, HttpError> {
        let mut stream = match self.conn.take() {
            Some(s) => s,
            None => {
                let s = TcpStream::connect(self.addr).await?;
                s.set_nodelay(true)?;
                s
            }
        };
        stream.write_all(req).await?;
        let (resp, keep) = read_response(&mut stream).await?;
        if keep {
            self.conn = Some(stream);
        }
        if !(200..300).contains(&resp.status) {
            return Err(HttpError::Status {
                status: resp.status,
                body: String::from_utf8_lossy(&resp.body)
                    .chars()
                    .take(200)
                    .collect(),
            });
        }
        Ok(resp.body)
    }
}

#[derive(Debug, PartialEq)]
struct Response {
    status: u16,
    body: Vec<u8>,
}

/// Reads one response; returns it and whether the connection may be reused.
async fn read_response<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> Result<(Response, bool), HttpError> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        match parse_response(&buf)? {
            Parsed::Complete(resp, keep) => return Ok((resp, keep)),
            Parsed::NeedMore => {}
        }
        if buf.len() > MAX_RESPONSE {
            return Err(HttpError::Malformed("response too large".into()));
        }
        let mut chunk = [0u8; 8192];
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            // Without a length, the body ends with the connection.
            return match parse_until_eof(&buf)? {
                Some(resp) => Ok((resp, false)),
                None => Err(HttpError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

enum Parsed {
    Complete(Response, bool),
    NeedMore,
}

struct Head {
    status: u16,
    len: usize,
    content_length: Option<usize>,
    chunked: bool,
    close: bool,
}

fn parse_head(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp
        .parse(buf)
        .map_err(|e| HttpError::Malformed(e.to_string()))?
    {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let status = resp
        .code
        .ok_or_else(|| HttpError::Malformed("no status".into()))?;
    let mut head = Head {
        status,
        len,
        content_length: None,
        chunked: false,
        close: false,
    };
    for h in resp.headers.iter() {
        let value = String::from_utf8_lossy(h.value).to_ascii_lowercase();
        if h.name.eq_ignore_ascii_case("content-length") {
            head.content_length = Some(
                value
                    .trim()
                    .parse()
                    .map_err(|_| HttpError::Malformed("content-length".into()))?,
            );
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.contains("chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            head.close = value.contains("close");
        }
    }
    Ok(Some(head))
}

fn parse_response(buf: &[u8]) -> Result<Parsed, HttpError> {
    let Some(head) = parse_head(buf)? else {
        return Ok(Parsed::NeedMore);
    };
    let rest = &buf[head.len..];
    if head.chunked {
        return Ok(match dechunk(rest)? {
            Some(body) => Parsed::Complete(
                Response {
                    status: head.status,
                    body,
                },
                !head.close,
            ),
            None => Parsed::NeedMore,
        });
    }
    // No body for 204/304, or an explicit length.
    let len = match (head.status, head.content_length) {
        (204 | 304, _) => Some(0),
        (_, l) => l,
    };
    match len {
        Some(n) if rest.len() >= n => Ok(Parsed::Complete(
            Response {
                status: head.status,
                body: rest[..n].to_vec(),
            },
            !head.close,
        )),
        _ => Ok(Parsed::NeedMore),
    }
}

fn parse_until_eof(buf: &[u8]) -> Result<Option<Response>, HttpError> {
    Ok(parse_head(buf)?.map(|head| Response {
        status: head.status,
        body: buf[head.len..].to_vec(),
    }))
}

/// Decodes a chunked body; `None` while incomplete.
fn dechunk(mut rest: &[u8]) -> Result<Option<Vec<u8>>, HttpError> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size_text = std::str::from_utf8(&rest[..line_end])
            .map_err(|_| HttpError::Malformed("chunk size".into()))?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| HttpError::Malformed("chunk size".into()))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            // Trailers end with an empty line; without trailers it is the next CRLF.
            return Ok(rest.windows(2).any(|w| w == b"\r\n").then_some(body));
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(raw: &[u8]) -> (Response, bool) {
        match parse_response(raw).unwrap() {
            Parsed::Complete(r, k) => (r, k),
            Parsed::NeedMore => panic!("incomplete"),
        }
    }

    #[test]
    fn content_length_and_chunked_bodies() {
        let (r, keep) = complete(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"ids\":[1]}");
        assert_eq!(
            (r.status, r.body.as_slice(), keep),
            (200, &b"{\"ids\":[1]}"[..], true)
        );
        let raw =
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
                    4\r\n{\"id\r\n6\r\ns\":[]}\r\n0\r\n\r\n";
        let (r, keep) = complete(raw);
        assert_eq!(
            (r.status, r.body.as_slice(), keep),
            (201, &b"{\"ids\":[]}"[..], false)
        );
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab"),
            Ok(Parsed::NeedMore)
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab"),
            Ok(Parsed::NeedMore)
        ));
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }

    #[tokio::test]
    async fn posts_and_reuses_the_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            for _ in 0..2 {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                // Read one request: head then the body its content-length announces.
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    got.extend_from_slice(&buf[..n]);
                    if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&got[..i]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .unwrap()
                            .parse()
                            .unwrap();
                        if got.len() >= i + 4 + len {
                            seen.push(head);
                            break;
                        }
                    }
                }
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            }
            seen
        });
        let mut c = ApiClient::new(addr, "k1", Duration::from_secs(5));
        for _ in 0..2 {
            let body = c
                .post_json("/api/v1/x", &serde_json::json!({"a": 1}))
                .await
                .unwrap();
            assert_eq!(body, b"ok");
        }
        let seen = server.await.unwrap();
        assert_eq!(seen.len(), 2, "both requests on one connection");
        assert!(
            seen[0].starts_with("post /api/v1/x http/1.1") && seen[0].contains("x-api-key: k1")
        );
    }
}
