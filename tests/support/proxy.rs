#![allow(clippy::unwrap_used)]
//! A TCP fault proxy on loopback: stands between the relay and Redis or
//! RabbitMQ so tests can cut, blackhole and restore the connection without
//! touching the machine's shared services.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Bytes flow both ways.
    Open,
    /// Existing connections are closed and new ones closed on accept.
    Cut,
    /// Connections stay open but nothing is forwarded (a silent peer).
    Blackhole,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, watcher) = watch::channel(Mode::Open);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let watcher = watcher.clone();
                tokio::spawn(async move {
                    if *watcher.borrow() == Mode::Cut {
                        return; // dropping the socket closes it
                    }
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    Box::pin(pipe(client, server, watcher)).await;
                });
            }
        });
        Self { addr, mode, task }
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    pub fn cut(&self) {
        self.set(Mode::Cut);
    }

    pub fn blackhole(&self) {
        self.set(Mode::Blackhole);
    }

    pub fn restore(&self) {
        self.set(Mode::Open);
    }

    /// `amqp://` URI through the proxy.
    pub fn amqp_uri(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// `redis://` URL through the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.set(Mode::Cut);
        self.task.abort();
    }
}

async fn pipe(client: TcpStream, server: TcpStream, mut mode: watch::Receiver<Mode>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let mut up = [0u8; 16 * 1024];
    let mut down = [0u8; 16 * 1024];
    loop {
        let current = *mode.borrow();
        match current {
            Mode::Cut => return,
            Mode::Blackhole => {
                // Stop reading either side until the mode changes.
                if mode.changed().await.is_err() {
                    return;
                }
                continue;
            }
            Mode::Open => {}
        }
        tokio::select! {
            changed = mode.changed() => if changed.is_err() { return },
            n = cr.read(&mut up) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if *mode.borrow() != Mode::Open { continue; }
                    if sw.write_all(&up[..n]).await.is_err() { return }
                }
            },
            n = sr.read(&mut down) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if *mode.borrow() != Mode::Open { continue; }
                    if cw.write_all(&down[..n]).await.is_err() { return }
                }
            },
        }
    }
}
