//! A real Mosquitto broker on loopback, started by the test that needs it.
//!
//! `.ci/run` installs Debian's `mosquitto` when it is missing and sets
//! `MERGEFLOW_REQUIRE_MOSQUITTO=1`, so CI fails rather than skips; on a
//! machine without it, tests that need it say so and pass.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Mosquitto {
    child: Child,
    pub port: u16,
    /// A second listener, on TLS, when started with [`Mosquitto::start_tls`].
    pub tls_port: Option<u16>,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

/// The broker's binary, if this machine has one.
fn binary() -> Option<PathBuf> {
    [
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/usr/bin/mosquitto",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

impl Mosquitto {
    /// Starts a broker on a free loopback port, or `None` (with a line
    /// saying why) when there is no `mosquitto` here and CI did not ask
    /// for one.
    pub fn start() -> Option<Mosquitto> {
        Mosquitto::launch(None)
    }

    /// [`start`](Mosquitto::start), with a second listener on TLS that
    /// presents `cert_pem` (its key: `key_pem`, PKCS#8).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Option<Mosquitto> {
        Mosquitto::launch(Some((cert_pem, key_pem)))
    }

    fn launch(tls: Option<(&str, &str)>) -> Option<Mosquitto> {
        let Some(bin) = binary() else {
            assert!(
                std::env::var_os("MERGEFLOW_REQUIRE_MOSQUITTO").is_none(),
                "MERGEFLOW_REQUIRE_MOSQUITTO is set and there is no mosquitto binary"
            );
            println!("skipped: no mosquitto here (apt-get install mosquitto; CI installs it)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        for _ in 0..5 {
            let port = free_port();
            let mut text = format!(
                "per_listener_settings false\nallow_anonymous true\npersistence false\n\
                 max_queued_messages 0\nmax_inflight_messages 0\nlog_dest stderr\n\
                 log_type error\nlog_type warning\nlistener {port} 127.0.0.1\n"
            );
            let tls_port = tls.map(|(cert, key)| {
                let (cert_file, key_file) =
                    (dir.path().join("cert.pem"), dir.path().join("key.pem"));
                std::fs::write(&cert_file, cert).unwrap();
                std::fs::write(&key_file, key).unwrap();
                let tls_port = free_port();
                text += &format!(
                    "listener {tls_port} 127.0.0.1\ncertfile {}\nkeyfile {}\n",
                    cert_file.display(),
                    key_file.display()
                );
                tls_port
            });
            std::fs::write(&conf, text).unwrap();
            let mut child = Command::new(&bin)
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start mosquitto");
            if wait_listening(port, &mut child)
                && tls_port.is_none_or(|p| wait_listening(p, &mut child))
            {
                return Some(Mosquitto {
                    child,
                    port,
                    tls_port,
                    conf,
                    _dir: dir,
                });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("mosquitto did not start on a free port in 5 tries");
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Stops the broker (kill -9: its queued messages are gone with it).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and config.
    pub fn restart(&mut self) {
        self.stop();
        let bin = binary().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut child = Command::new(&bin)
                .arg("-c")
                .arg(&self.conf)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start mosquitto");
            if wait_listening(self.port, &mut child) {
                self.child = child;
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(Instant::now() < deadline, "mosquitto did not restart");
        }
    }

    pub fn conf(&self) -> &Path {
        &self.conf
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls until the broker takes connections, or it exits.
fn wait_listening(port: u16, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            return false; // the port was taken meanwhile
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
