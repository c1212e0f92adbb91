//! API keys: who may call, and that one caller never sees another's
//! generations.

use serde_json::Value;

use crate::common::{TestServer, chat, client, completion_id, read_all};

#[tokio::test]
async fn keys_are_required_when_configured() {
    let server = TestServer::options().keys(&["k1", "k2"]).start().await;
    let url = server.url("/v1/chat/completions");
    let missing = client()
        .post(&url)
        .json(&chat("x", false))
        .send()
        .await
        .expect("sent");
    assert_eq!(missing.status(), 401);
    let error: Value = missing.json().await.expect("json");
    assert_eq!(error["error"]["type"], "authentication_error");
    let wrong = client()
        .post(&url)
        .bearer_auth("k3")
        .json(&chat("x", false))
        .send()
        .await
        .expect("sent");
    assert_eq!(wrong.status(), 401);
    let models = client()
        .get(server.url("/v1/models"))
        .send()
        .await
        .expect("sent");
    assert_eq!(models.status(), 401);
    for key in ["k1", "k2"] {
        let ok = client()
            .post(&url)
            .bearer_auth(key)
            .json(&chat("x", false))
            .send()
            .await
            .expect("sent");
        assert_eq!(ok.status(), 200);
    }
    let health = client()
        .get(server.url("/health"))
        .send()
        .await
        .expect("sent");
    assert_eq!(health.status(), 200, "liveness needs no key");
}

#[tokio::test]
async fn another_caller_cannot_cancel_or_resume_a_generation() {
    let server = TestServer::options()
        .keys(&["alice", "mallory"])
        .delay(std::time::Duration::from_millis(30))
        .start()
        .await;
    let resp = client()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth("alice")
        .header("x-session-id", "s")
        .json(&chat("private words here", true))
        .send()
        .await
        .expect("sent");
    let id = completion_id(&resp);

    let cancel = client()
        .post(server.url(&format!("/v1/chat/completions/{id}/cancel")))
        .bearer_auth("mallory")
        .send()
        .await
        .expect("sent");
    assert_eq!(cancel.status(), 404);
    let events = client()
        .get(server.url(&format!("/v1/chat/completions/{id}/events")))
        .bearer_auth("mallory")
        .send()
        .await
        .expect("sent");
    assert_eq!(events.status(), 404);
    let session = client()
        .get(server.url("/v1/sessions/s/stream"))
        .bearer_auth("mallory")
        .send()
        .await
        .expect("sent");
    assert_eq!(session.status(), 204);
    let replay = client()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth("mallory")
        .header("last-event-id", format!("{id}.0"))
        .json(&chat("mine", true))
        .send()
        .await
        .expect("sent");
    assert_ne!(
        replay.headers()["x-completion-id"],
        id.as_str(),
        "a new generation, not alice's"
    );
    assert_eq!(read_all(replay).await.text, "mine");

    let t = read_all(resp).await;
    assert_eq!(t.text, "private words here");
    assert_eq!(t.finish_reason.as_deref(), Some("stop"));
}
