//! A real S3-compatible server for the object-storage tests: moto's
//! standalone server (`moto_server`, from the test virtualenv) on a loopback
//! port, with one bucket, stopped when dropped.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tlserve::storage::{S3Credentials, S3Location};

use super::{http_client, python};

pub struct Moto {
    child: Child,
    pub addr: SocketAddr,
}

impl Moto {
    /// Starts moto on a free loopback port and creates `bucket`.
    pub fn start(bucket: &str) -> Self {
        let server = python()
            .parent()
            .expect("the venv's python lives in bin/")
            .join("moto_server");
        assert!(
            server.is_file(),
            "moto_server is missing at {}: run scripts/setup-python.sh",
            server.display()
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(&server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let moto = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(moto.addr).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let created = http_client::request(moto.addr, "PUT", &format!("/{bucket}"), &[], b"");
        assert_eq!(created.status, 200, "create bucket {bucket}");
        moto
    }

    /// The bucket under `prefix` as tlserve reaches it.
    pub fn location(&self, bucket: &str, prefix: &str) -> S3Location {
        S3Location {
            bucket: bucket.into(),
            prefix: prefix.into(),
            region: "us-east-1".into(),
            endpoint: Some(format!("http://{}", self.addr)),
            allow_http: true,
            credentials: Some(S3Credentials {
                key_id: "testing".into(),
                secret: "testing".into(),
            }),
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
