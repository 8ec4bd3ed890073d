//! The test-support fixtures that other tests build on do what they claim:
//! a private RabbitMQ node starts, takes confirmed publishes, blocks and
//! unblocks publishers under a memory alarm, and stops without leaving a
//! process or a bound port; a small tmpfs really fills up with ENOSPC and
//! gives the space back.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on purpose

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Event, PublisherConfirm};
use support::rabbit_node::PrivateRabbit;
use support::tmpfs::SmallFs;

/// A connection with a confirming channel and an exclusive queue on it.
async fn publisher(rabbit: &PrivateRabbit) -> (Connection, Channel, String) {
    let conn = Connection::connect(&rabbit.amqp_uri(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let queue = support::unique("private.q");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    (conn, channel, queue)
}

/// Publishes to `queue` through the default exchange; the confirm is
/// returned unawaited.
async fn publish(channel: &Channel, queue: &str, body: &[u8]) -> PublisherConfirm {
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .unwrap()
}

/// The number of messages ready in `queue`, from a passive declare.
async fn ready(channel: &Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
}

/// The next blocked or unblocked event within 10 s; others (`Connected`,
/// which lapin may emit after `connect` returned) are skipped, errors fail.
async fn next_block_event(events: &mut (impl futures_util::Stream<Item = Event> + Unpin)) -> Event {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .expect("a blocked/unblocked event within 10 s")
            .expect("event stream open");
        match event {
            Event::ConnectionBlocked(_) | Event::ConnectionUnblocked => return event,
            Event::Error(e) => panic!("connection error: {e}"),
            _ => {}
        }
    }
}

fn is_mounted(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let dir = dir.to_str().unwrap();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(dir))
}

fn epmd_names() -> String {
    let out = std::process::Command::new("epmd")
        .arg("-names")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_node_takes_confirmed_publishes() {
    let started = Instant::now();
    let rabbit = PrivateRabbit::start().await;
    eprintln!(
        "{} up on {} in {:?}",
        rabbit.node_name(),
        rabbit.port(),
        started.elapsed()
    );
    assert_ne!(rabbit.port(), 5672, "not the shared node's port");
    assert_eq!(
        rabbit.amqp_uri(),
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", rabbit.port())
    );

    let (conn, channel, queue) = publisher(&rabbit).await;
    for i in 0..10 {
        let confirm = publish(&channel, &queue, format!("m{i}").as_bytes()).await;
        let confirmation = tokio::time::timeout(Duration::from_secs(5), confirm)
            .await
            .expect("confirm within 5 s")
            .unwrap();
        assert!(confirmation.is_ack(), "message {i} acked");
    }
    assert_eq!(ready(&channel, &queue).await, 10);

    // rabbitmqctl reaches the same node the AMQP port belongs to.
    assert!(rabbit
        .ctl(&["eval", "node()."])
        .contains(rabbit.node_name()));
    let queues = rabbit.ctl(&["list_queues", "name", "messages"]);
    assert!(
        queues
            .lines()
            .any(|l| l.contains(&queue) && l.contains("10")),
        "{queue} with 10 messages in:\n{queues}"
    );
    conn.close(200, "done".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_alarm_blocks_and_unblocks_a_publisher() {
    let rabbit = PrivateRabbit::start().await;
    let (conn, channel, queue) = publisher(&rabbit).await;
    let mut events = Box::pin(conn.events_listener());
    let before = publish(&channel, &queue, b"before").await.await.unwrap();
    assert!(before.is_ack());
    assert!(!conn.status().blocked());

    rabbit.set_memory_alarm(true);
    assert!(rabbit.memory_alarm());
    // RabbitMQ 3.10 sends connection.blocked only once the connection
    // publishes under the alarm (an idle one is never told); the publish is
    // sent in a task because lapin holds writes while blocked.
    let held = {
        let channel = channel.clone();
        let queue = queue.clone();
        tokio::spawn(async move { publish(&channel, &queue, b"held").await.await })
    };
    match next_block_event(&mut events).await {
        Event::ConnectionBlocked(reason) => assert!(reason.contains("memory"), "{reason}"),
        other => panic!("expected ConnectionBlocked, got {other:?}"),
    }
    assert!(conn.status().blocked());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!held.is_finished(), "no confirm while the alarm is on");

    rabbit.set_memory_alarm(false);
    assert!(!rabbit.memory_alarm());
    match next_block_event(&mut events).await {
        Event::ConnectionUnblocked => {}
        other => panic!("expected ConnectionUnblocked, got {other:?}"),
    }
    assert!(!conn.status().blocked());
    let held = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("the held publish is confirmed after the alarm clears")
        .unwrap()
        .unwrap();
    assert!(held.is_ack());
    assert_eq!(ready(&channel, &queue).await, 2);
    conn.close(200, "done".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_run_side_by_side_and_stop_cleanly() {
    let (mut a, b) = tokio::join!(PrivateRabbit::start(), PrivateRabbit::start());
    assert_ne!(a.port(), b.port());
    assert_ne!(a.node_name(), b.node_name());
    let (a_port, a_pid) = (a.port(), a.os_pid().unwrap());
    let a_short = a.node_name().split('@').next().unwrap().to_string();
    assert!(epmd_names().contains(&a_short));

    a.stop();
    assert!(
        !Path::new(&format!("/proc/{a_pid}")).exists(),
        "a's process is gone"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", a_port)).is_err(),
        "nothing answers on a's port"
    );
    std::net::TcpListener::bind(("127.0.0.1", a_port)).expect("a's port is free again");
    assert!(!epmd_names().contains(&a_short), "a left epmd");
    assert!(a.dir().exists(), "stop keeps the logs until drop");

    // b does not notice a's stop.
    let conn = Connection::connect(&b.amqp_uri(), ConnectionProperties::default())
        .await
        .unwrap();
    conn.close(200, "done".into()).await.unwrap();

    // Drop alone (no stop) leaves nothing behind either.
    let (b_pid, b_dir, b_port) = (b.os_pid().unwrap(), b.dir().to_owned(), b.port());
    drop(b);
    assert!(!Path::new(&format!("/proc/{b_pid}")).exists());
    assert!(!b_dir.exists());
    assert!(std::net::TcpStream::connect(("127.0.0.1", b_port)).is_err());
    let a_dir = a.dir().to_owned();
    drop(a);
    assert!(!a_dir.exists());
}

#[test]
fn small_fs_fills_up_with_enospc_and_frees() {
    let fs = SmallFs::mount(256);
    let dir = fs.path().to_owned();
    assert!(is_mounted(&dir), "{} is a mount point", dir.display());
    std::fs::write(dir.join("before"), b"fits").unwrap();

    let filler = fs.fill();
    let filled = std::fs::metadata(&filler).unwrap().len();
    assert!(
        (200 * 1024..=256 * 1024).contains(&filled),
        "filler is {filled} bytes"
    );
    let err = std::fs::write(dir.join("after"), b"x").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::StorageFull, "{err}");

    fs.free();
    assert!(!filler.exists());
    std::fs::write(dir.join("after"), vec![0_u8; 64 * 1024]).unwrap();

    drop(fs);
    assert!(!is_mounted(&dir), "unmounted on drop");
    assert!(!dir.exists(), "directory removed on drop");
}
