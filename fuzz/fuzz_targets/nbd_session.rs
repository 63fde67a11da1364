//! A whole NBD session from arbitrary client bytes: the handshake and the request decoder
//! never panic and never hang, whatever arrives; the codec's parsers reject or accept
//! cleanly, and a parsed request re-encodes to the same bytes.
#![no_main]
use std::sync::Arc;
use std::time::Duration;

use blockdev::{BlockDev, MemDev};
use libfuzzer_sys::fuzz_target;
use nbd_server::proto::{self, Request};
use nbd_server::{Config, Export, StaticExports};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    if let Some(head) = data.get(..proto::REQUEST_LEN) {
        let head: &[u8; proto::REQUEST_LEN] = head.try_into().unwrap();
        if let Ok(r) = Request::parse(head) {
            assert_eq!(&r.to_bytes(), head);
        }
    }
    let _ = proto::parse_info_request(data);
    let _ = proto::parse_meta_request(data);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let dev: Arc<dyn BlockDev> = Arc::new(MemDev::new(vec![0x5a; 1 << 16]));
        let exports = Arc::new(StaticExports::new(vec![Export::new("d", "fuzz", dev)]));
        let config = Config { handshake_timeout: Duration::from_secs(5), ..Config::default() };
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let serve = tokio::spawn(async move { nbd_server::serve_connection(server, exports, &config).await });
        // Send everything and close our side while draining the replies, until the server
        // hangs up.
        let (mut rd, mut wr) = tokio::io::split(client);
        let input = data.to_vec();
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        });
        let mut sink = Vec::new();
        let drained = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut sink)).await;
        let _ = writer.await;
        assert!(drained.is_ok(), "server hung after the client closed");
        let done = tokio::time::timeout(Duration::from_secs(10), serve).await;
        assert!(done.is_ok(), "server task did not finish");
    });
});
