//! Poison records go to the dead-letter topic with their origin, the groups move on, and a
//! redrive sends dead letters back through the pipeline.

use std::time::Duration;

use bytes::Bytes;
use conveyor::ops::{dead_letters, redrive};
use conveyor_schemas::{Envelope, Event, MediaDescribed};
use conveyor_storage::events::to_record;
use conveyor_storage::log::Record;
use conveyor_tests::helpers::{ALICE, TestApp, wait_until};
use conveyor_tests::images;
use serde_json::Value;

conveyor_tests::on_every_log!(a_poison_record_is_dead_lettered_and_a_redrive_reprocesses_it);
conveyor_tests::on_every_log!(a_flood_of_undecodable_records_is_dead_lettered_at_once);

async fn a_poison_record_is_dead_lettered_and_a_redrive_reprocesses_it(app: TestApp) {
    let (log, topic, dlq) = (
        app.backends.log.clone(),
        app.settings.topic().to_owned(),
        app.settings.dlq_topic(),
    );
    let poison_key = uuid::Uuid::now_v7().to_string();
    let poison = Record {
        key: poison_key.clone().into_bytes(),
        headers: vec![("content-type".into(), "application/x-bincode".into())],
        value: Bytes::from_static(b"\xff\xff\xff\xff not an envelope"),
    };
    let at = log.append(&topic, vec![poison]).await.unwrap()[0];

    // Every group (processor, transcoder, projector) dead-letters it at once (nothing about it
    // can change), and says where it came from.
    let letters = letters_when(&*log, &dlq, |n| n == 3)
        .await
        .expect("the poison record was dead-lettered by every group");
    // `ops status` counts them, and sees both groups past the poison record.
    let status = conveyor::ops::status(&app.settings).await.unwrap();
    assert_eq!(status.dead_letters, 3);
    assert!(status.topic_exists && status.records >= 1);
    assert!(status.backends.values().all(|h| h.ok));
    for group in [
        &app.settings.processor.group,
        &app.settings.projector.group,
        &app.settings.video.group,
    ] {
        assert!(
            status.groups.iter().any(|g| &g.group == group),
            "{group} listed"
        );
    }
    let mut groups: Vec<&str> = letters
        .iter()
        .map(|d| d.header("dlq-group").unwrap())
        .collect();
    groups.sort();
    assert_eq!(
        groups,
        vec![
            app.settings.processor.group.as_str(),
            app.settings.projector.group.as_str(),
            app.settings.video.group.as_str(),
        ]
    );
    for d in &letters {
        assert_eq!(d.key, poison_key.as_bytes());
        assert_eq!(d.header("dlq-topic"), Some(topic.as_str()));
        assert_eq!(
            d.header("dlq-partition"),
            Some(at.partition.to_string().as_str())
        );
        assert_eq!(d.header("dlq-offset"), Some(at.offset.to_string().as_str()));
        assert_eq!(
            d.header("dlq-attempts"),
            Some("1"),
            "a permanent failure is not retried"
        );
        assert!(
            d.header("dlq-error").unwrap().contains("undecodable"),
            "{:?}",
            d.headers
        );
    }

    // The groups moved on: an upload behind the poison record is processed.
    let response = app.upload(ALICE, images::jpeg(64, 48, 9), None).await;
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(app.wait_processed(&id).await["status"], "processed");

    // A dead letter that fails no more (say, from a bug fixed since): a description of that
    // upload. A redrive sends it, and the poison, back once each.
    let description = titled(&id, "redriven");
    let mut letter = to_record(&description);
    letter.headers.extend([
        ("dlq-topic".to_owned(), topic.clone()),
        ("dlq-partition".to_owned(), "0".to_owned()),
        ("dlq-offset".to_owned(), "999999".to_owned()),
        ("dlq-group".to_owned(), app.settings.projector.group.clone()),
    ]);
    log.append(&dlq, vec![letter]).await.unwrap();
    assert_eq!(
        redrive(&*log, &app.settings).await.unwrap(),
        2,
        "one per original record"
    );

    app.wait_for_title(&id, "redriven").await;
    // The poison went through every group again, and failed again.
    let again = letters_when(&*log, &dlq, |n| n == 3)
        .await
        .expect("the redriven poison was dead-lettered again");
    assert!(again.iter().all(|d| d.key == poison_key.as_bytes()));
    assert!(
        again
            .iter()
            .all(|d| d.header("dlq-offset") != Some(at.offset.to_string().as_str())),
        "the redriven copy"
    );
}

/// Reported: 100 records that cannot be decoded delayed a good event behind them by 78 s,
/// each retried with backoff although nothing about it could change. Now each goes to the
/// dead-letter topic at once: a hundred of them, on the item's own partition ahead of its
/// description, cost every group well under a second each (the bound below is 0.2 s a
/// record; with the old backoff they took 0.75 s each), and the description is applied.
async fn a_flood_of_undecodable_records_is_dead_lettered_at_once(app: TestApp) {
    let response = app.upload(ALICE, images::jpeg(40, 30, 5), None).await;
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_processed(&id).await;
    let (log, topic, dlq) = (
        app.backends.log.clone(),
        app.settings.topic().to_owned(),
        app.settings.dlq_topic(),
    );
    let poison: Vec<Record> = (0..100u8)
        .map(|i| Record {
            key: id.clone().into_bytes(),
            headers: vec![("content-type".into(), "application/x-bincode".into())],
            value: Bytes::from([b"\xff\xff\xff\xff not an envelope ".as_slice(), &[i]].concat()),
        })
        .collect();
    log.append(&topic, poison).await.unwrap();
    let description = titled(&id, "behind the flood");
    log.append(&topic, vec![to_record(&description)])
        .await
        .unwrap();

    let started = std::time::Instant::now();
    // Within `wait_for_title`'s 20 s: 0.2 s a record at most.
    app.wait_for_title(&id, "behind the flood").await;
    // Processor, transcoder and projector each dead-letter every one of them, once.
    let letters = letters_when(&*log, &dlq, |n| n == 300)
        .await
        .expect("300 dead letters: every group, every undecodable record");
    assert!(letters.iter().all(|d| d.key == id.as_bytes()));
    assert!(
        letters
            .iter()
            .all(|d| d.header("dlq-attempts") == Some("1"))
    );
    eprintln!(
        "100 undecodable records dead-lettered by 3 groups and the event behind them applied in {:.1?}",
        started.elapsed()
    );
}

/// The dead letters waiting on `dlq` once their count satisfies `enough`, or `None` if it does
/// not within 30 s.
async fn letters_when(
    log: &dyn conveyor_storage::EventLog,
    dlq: &str,
    enough: impl Fn(usize) -> bool,
) -> Option<Vec<conveyor_storage::log::Delivered>> {
    wait_until(Duration::from_secs(30), || async {
        let letters = dead_letters(log, dlq).await.ok()?;
        enough(letters.len()).then_some(letters)
    })
    .await
}

/// An event that gives media `id` the title `title`, as a producer would append it.
fn titled(id: &str, title: &str) -> Envelope {
    Envelope::new(
        uuid::Uuid::parse_str(id).unwrap(),
        conveyor_storage::clock::now_micros() as u64,
        "test",
        Event::MediaDescribed(MediaDescribed {
            title: Some(title.into()),
            description: None,
            tags: vec![],
        }),
    )
}
