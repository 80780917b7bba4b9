//! Two endpoints on loopback: requests and answers cross, traffic is counted, and a peer
//! that is not configured is refused.

use std::time::Duration;

use libp2p::identity::Keypair;
use mbtd_cluster::{Endpoint, EndpointConfig, PeerEvent, RequestError};

fn config(listen: bool, allowed: Vec<mbtd_cluster::PeerId>) -> EndpointConfig {
    EndpointConfig {
        listen: listen.then(|| "/ip4/127.0.0.1/tcp/0".parse().unwrap()),
        allowed,
        request_timeout: Duration::from_secs(2),
        max_message_bytes: 1 << 20,
        kameo_global: false,
    }
}

#[tokio::test]
async fn a_configured_peer_gets_answers_and_a_stranger_is_refused() {
    let (node_key, coord_key, stranger_key) = (
        Keypair::generate_ed25519(),
        Keypair::generate_ed25519(),
        Keypair::generate_ed25519(),
    );
    let (node_id, coord_id) = (
        node_key.public().to_peer_id(),
        coord_key.public().to_peer_id(),
    );
    let (node, mut requests, mut node_events) =
        Endpoint::start(node_key, config(true, vec![coord_id]))
            .await
            .unwrap();
    let addr = node.listen_addrs()[0].clone();
    let answering = node.clone();
    tokio::spawn(async move {
        while let Some(req) = requests.recv().await {
            let mut reply = req.bytes.clone();
            reply.reverse();
            answering.respond(req.id, reply);
        }
    });

    let (coord, _, _) = Endpoint::start(coord_key, config(false, vec![node_id]))
        .await
        .unwrap();
    coord.dial(addr.clone()).await.unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    let answer = coord.request(node_id, payload.clone()).await.unwrap();
    assert_eq!(answer, payload.iter().rev().copied().collect::<Vec<_>>());
    let t = coord.traffic()[&node_id];
    assert_eq!((t.bytes_out, t.bytes_in), (200_004, 200_004));
    assert!(
        matches!(node_events.recv().await, Some(PeerEvent::Up { peer, .. }) if peer == coord_id)
    );

    // a process whose identity the node does not list cannot get an answer
    let stranger_id = stranger_key.public().to_peer_id();
    let (stranger, _, _) = Endpoint::start(stranger_key, config(false, vec![node_id]))
        .await
        .unwrap();
    let _ = stranger.dial(addr).await;
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match node_events.recv().await {
                Some(PeerEvent::Refused { peer, .. }) => return peer,
                Some(_) => continue,
                None => panic!("node stopped"),
            }
        }
    })
    .await
    .expect("the node reports the refusal");
    assert_eq!(refused, Some(stranger_id));
    let err = stranger.request(node_id, vec![1, 2, 3]).await.unwrap_err();
    assert!(
        matches!(
            err,
            RequestError::Unreachable(..) | RequestError::Failed(..)
        ),
        "{err:?}"
    );
}
