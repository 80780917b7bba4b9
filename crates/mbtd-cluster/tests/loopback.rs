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

/// A kept peer's address answering with another identity is refused and reported once
/// (with the identity met there), not at every redial, and nothing is sent to it.
#[tokio::test]
async fn an_address_that_answers_with_another_identity_is_refused_once() {
    let (coord_key, there_key, expected_key) = (
        Keypair::generate_ed25519(),
        Keypair::generate_ed25519(),
        Keypair::generate_ed25519(),
    );
    let coord_id = coord_key.public().to_peer_id();
    let (there_id, expected_id) = (
        there_key.public().to_peer_id(),
        expected_key.public().to_peer_id(),
    );
    let (there, _requests, _) = Endpoint::start(there_key, config(true, vec![coord_id]))
        .await
        .unwrap();
    let addr = there.listen_addrs()[0].clone();
    let (coord, _, mut events) = Endpoint::start(coord_key, config(false, vec![expected_id]))
        .await
        .unwrap();
    coord.keep_connected(expected_id, addr.clone());
    let first = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("the refusal is reported");
    match first {
        Some(PeerEvent::Refused { peer, addr: met }) => {
            assert_eq!(peer, Some(there_id));
            assert!(met.to_string().starts_with(&addr.to_string()), "{met}");
        }
        other => panic!("expected a refusal: {other:?}"),
    }
    // several redials later, no second report and no connection
    let more =
        tokio::time::timeout(mbtd_cluster::endpoint::REDIAL_INTERVAL * 6, events.recv()).await;
    assert!(more.is_err(), "reported again: {more:?}");
    // a request to the listed peer finds no connection: it fails and is not counted
    let err = coord.request(expected_id, vec![7; 1000]).await.unwrap_err();
    assert!(matches!(err, RequestError::Unreachable(..)), "{err:?}");
    let out = coord.traffic().get(&expected_id).map_or(0, |t| t.bytes_out);
    assert_eq!(out, 0);
}
