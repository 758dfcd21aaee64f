//! Order comes from the log, not from clocks (issue 24, item 1). Reported: with 5 s of skew
//! between two ingest replicas, a description sent through the one behind was silently lost; an
//! ingest replica two days ahead accepted uploads that never became visible; a projector two days
//! behind dead-lettered correct events. Here every role runs as its own process, on the embedded
//! engines (the skewed ones under libfaketime, whole processes) and on Kafka with Cassandra (the
//! skewed ones with Conveyor's own clock offset: librdkafka's timed waits spin under a clock set
//! back by libfaketime). Every acknowledged write is visible, in the order the log holds, and
//! nothing is dead-lettered.

use std::time::Duration;

use conveyor::ops::dead_letters;
use conveyor_config::Settings;
use conveyor_schemas::{Envelope, Event, MediaDescribed};
use conveyor_storage::backends::open_log;
use conveyor_storage::events::to_record;
use conveyor_tests::helpers::{
    ALICE, Process, SERVICE, Skew, TestApp, cql_views, kafka_brokers, start_process_at, wait_until,
};
use conveyor_tests::images;
use serde_json::{Value, json};

conveyor_tests::on_every_log!(a_producer_days_ahead_is_bounded_and_the_next_description_wins);

/// The roles, each a process of its own, with the clock each one runs on.
struct Cluster {
    /// The ingest replica whose clock is right.
    ingest: Process,
    /// An ingest replica 5 s behind.
    behind: Process,
    /// An ingest replica 2 days ahead.
    ahead: Process,
    query: Process,
    _consumers: Vec<Process>,
    client: reqwest::Client,
}

impl Cluster {
    /// Starts two right-clock roles (`ingest`, `query`), two skewed ingest replicas, a processor
    /// 5 s ahead and a projector 2 days behind, all on `env`'s engines, skewed through
    /// libfaketime or, on Kafka, Conveyor's own clock offset.
    fn start(dir: &std::path::Path, env: &[(&str, String)], on_kafka: bool) -> Cluster {
        const DAY_MS: i64 = 86_400_000;
        let skew = |faketime: &'static str, ms: i64| {
            Some(if on_kafka {
                Skew::Offset(ms)
            } else {
                Skew::Faketime(faketime)
            })
        };
        // The first ingest replica creates the topics; the others and the consumers find them.
        let ingest = start_process_at("ingest", dir, env, None);
        Cluster {
            behind: start_process_at("ingest", dir, env, skew("-5s", -5_000)),
            ahead: start_process_at("ingest", dir, env, skew("+2d", 2 * DAY_MS)),
            query: start_process_at("query", dir, env, None),
            _consumers: vec![
                start_process_at("process", dir, env, skew("+5s", 5_000)),
                start_process_at("project", dir, env, skew("-2d", -2 * DAY_MS)),
            ],
            ingest,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }

    async fn upload(&self, through: &Process, seed: u32) -> String {
        let form = reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(images::jpeg(32, 24, seed)).file_name("p.jpg"),
        );
        let response = self
            .client
            .post(format!("{}/v1/media", through.address))
            .bearer_auth(ALICE)
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "the upload is accepted");
        let body: Value = response.json().await.unwrap();
        body["id"].as_str().unwrap().to_owned()
    }

    /// Sends `payload` for `id` through `through` as an internal producer; 202 expected.
    async fn event(&self, through: &Process, id: &str, payload: Value) {
        let response = self
            .client
            .post(format!("{}/v1/events", through.address))
            .bearer_auth(SERVICE)
            .json(&json!({"aggregate_id": id, "payload": payload}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "the event is accepted");
    }

    async fn describe(&self, through: &Process, id: &str, title: &str) {
        let payload = json!({"MediaDescribed": {"title": title, "description": null, "tags": []}});
        self.event(through, id, payload).await;
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .client
            .get(format!("{}{path}", self.query.address))
            .bearer_auth(ALICE)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Waits up to a minute for `id` to satisfy `check`, and returns the item.
    async fn wait_for(&self, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let path = format!("/v1/media/{id}");
        let found = wait_until(Duration::from_secs(60), || async {
            let (status, body) = self.get(&path).await;
            (status == 200 && check(&body)).then_some(body)
        })
        .await;
        match found {
            Some(item) => item,
            None => panic!("{id}: never {what}; last seen {:?}", self.get(&path).await),
        }
    }

    async fn wait_for_title(&self, id: &str, title: &str) {
        self.wait_for(id, &format!("titled {title:?}"), |b| b["title"] == title)
            .await;
    }
}

async fn skewed_replicas_lose_nothing(
    dir: &std::path::Path,
    settings: &Settings,
    env: &[(&str, String)],
) {
    let on_kafka = env.iter().any(|(k, _)| *k == "CONVEYOR__LOG__URI");
    let cluster = Cluster::start(dir, env, on_kafka);

    // An upload through the right clock, processed by a processor ahead and projected by a
    // projector two days behind.
    let first = cluster.upload(&cluster.ingest, 1).await;
    cluster
        .wait_for(&first, "processed", |b| b["status"] == "processed")
        .await;

    // A description, then another a moment later through the replica 5 s behind: the second
    // is last in the log, so it stands, although its version is 5 s lower.
    cluster.describe(&cluster.ingest, &first, "first").await;
    cluster.wait_for_title(&first, "first").await;
    cluster
        .describe(&cluster.behind, &first, "second, 5 s behind")
        .await;
    cluster.wait_for_title(&first, "second, 5 s behind").await;
    // And back through the right clock.
    cluster.describe(&cluster.ingest, &first, "third").await;
    cluster.wait_for_title(&first, "third").await;

    // An upload through the replica two days ahead becomes visible, and is described through
    // the one behind.
    let ahead = cluster.upload(&cluster.ahead, 2).await;
    cluster
        .wait_for(&ahead, "processed", |b| b["status"] == "processed")
        .await;
    cluster
        .describe(&cluster.behind, &ahead, "described from behind")
        .await;
    cluster
        .wait_for_title(&ahead, "described from behind")
        .await;

    // A delete through the replica behind hides an item uploaded through the one ahead.
    let deleted = cluster.upload(&cluster.ahead, 3).await;
    cluster
        .wait_for(&deleted, "processed", |b| b["status"] == "processed")
        .await;
    let response = cluster
        .client
        .delete(format!("{}/v1/media/{deleted}", cluster.behind.address))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "the delete is accepted");
    let path = format!("/v1/media/{deleted}");
    wait_until(Duration::from_secs(60), || async {
        (cluster.get(&path).await.0 == 404).then_some(())
    })
    .await
    .expect("the delete took effect");

    // The owner's timeline and stats hold exactly the two live items.
    let (_, timeline) = cluster.get("/v1/owners/alice/media").await;
    let mut listed: Vec<&str> = timeline["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    listed.sort();
    let mut live = vec![first.as_str(), ahead.as_str()];
    live.sort();
    assert_eq!(listed, live, "the timeline: {timeline}");
    let (_, stats) = cluster.get("/v1/owners/alice/stats").await;
    assert_eq!(stats["media_count"], 2, "{stats}");

    // Nothing reached the dead-letter topic.
    let log = open_log(settings).unwrap();
    let letters = dead_letters(&*log, &settings.dlq_topic()).await.unwrap();
    assert!(letters.is_empty(), "dead-lettered: {letters:?}");
}

/// The common environment of every role: the keys the test uses, a short cache, and `extra`.
fn environment(extra: Vec<(&'static str, String)>) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("CONVEYOR__AUTH__API_KEYS", format!("alice:{ALICE}")),
        (
            "CONVEYOR__AUTH__SERVICE_KEYS",
            format!("describer:{SERVICE}"),
        ),
        ("CONVEYOR__QUERY__CACHE_TTL_MS", "200".to_owned()),
        ("CONVEYOR__LOG__DURABILITY", "os".to_owned()),
    ];
    env.extend(extra);
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_replicas_lose_nothing_on_the_embedded_engines() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings::for_test(dir.path());
    let env = environment(vec![]);
    skewed_replicas_lose_nothing(dir.path(), &settings, &env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_replicas_lose_nothing_on_kafka_and_cassandra() {
    let Some(brokers) = kafka_brokers() else {
        return;
    };
    let Some(views) = cql_views().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut settings = Settings::for_test(dir.path());
    settings.log.uri = Some(conveyor_config::LogUri::Kafka(brokers));
    settings.log.topic = format!("clocks-{run}");
    settings.processor.group = format!("processor-{run}");
    settings.projector.group = format!("projector-{run}");
    settings.views = views;
    let env = environment(vec![
        ("CONVEYOR__LOG__URI", settings.log_uri().to_string()),
        ("CONVEYOR__LOG__TOPIC", settings.log.topic.clone()),
        (
            "CONVEYOR__LOG__PARTITIONS",
            settings.log.partitions.to_string(),
        ),
        ("CONVEYOR__LOG__SESSION_TIMEOUT_MS", "6000".to_owned()),
        (
            "CONVEYOR__PROCESSOR__GROUP",
            settings.processor.group.clone(),
        ),
        (
            "CONVEYOR__PROJECTOR__GROUP",
            settings.projector.group.clone(),
        ),
        (
            "CONVEYOR__VIEWS__URI",
            settings.views.uri.clone().unwrap().to_string(),
        ),
        ("CONVEYOR__VIEWS__REPLICATION_FACTOR", "1".to_owned()),
    ]);
    skewed_replicas_lose_nothing(dir.path(), &settings, &env).await;
}

/// A direct producer whose version is days ahead of the log, or forged at the top of the range:
/// its description is applied (lowered to a day past the record's append time, and counted),
/// the next description in the log still replaces it, and nothing is dead-lettered. This was
/// once refused as permanent, by the projector's own clock.
async fn a_producer_days_ahead_is_bounded_and_the_next_description_wins(app: TestApp) {
    let response = app.upload(ALICE, images::jpeg(40, 30, 3), None).await;
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_processed(&id).await;
    let media_id = uuid::Uuid::parse_str(&id).unwrap();
    let describe = |version: u64, title: &str| {
        to_record(&Envelope::new(
            media_id,
            version,
            "skewed-producer",
            Event::MediaDescribed(MediaDescribed {
                title: Some(title.into()),
                description: None,
                tags: vec![],
            }),
        ))
    };
    let (log, topic) = (app.backends.log.clone(), app.settings.topic().to_owned());
    let now = conveyor_storage::clock::now_micros() as u64;
    let two_days = 2 * 86_400 * 1_000_000;
    for (version, title) in [
        (now + two_days, "from two days ahead"),
        (u64::MAX, "forged at the top"),
        (now, "after them in the log"),
    ] {
        log.append(&topic, vec![describe(version, title)])
            .await
            .unwrap();
        app.wait_for_title(&id, title).await;
    }
    app.wait_caught_up().await;
    let letters = dead_letters(&*app.backends.log, &app.settings.dlq_topic())
        .await
        .unwrap();
    assert!(letters.is_empty(), "nothing dead-lettered: {letters:?}");
}
