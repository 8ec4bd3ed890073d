//! The helper subcommands scripts/bench and scripts/capacity run around the
//! load modes: `queue-bind`, `queue-count`, `free-port` and `cleanup`.

use std::time::Duration;

use anyhow::bail;

use crate::report::ResultLine;
use crate::{amqp, check_loopback_amqp, client};

/// Declares `exchange` and a queue bound to it that outlives this process
/// and expires `expires_secs` after its last use.
pub fn queue_bind(
    exchange: &str,
    queue: &str,
    expires_secs: u64,
    amqp_uri: &str,
) -> anyhow::Result<()> {
    check_loopback_amqp(amqp_uri)?;
    let rt = client::runtime(1)?;
    rt.block_on(async {
        let (conn, channel) = amqp::connect(amqp_uri, "loadgen-queue").await?;
        amqp::declare_exchange(&channel, exchange).await?;
        amqp::lasting_counting_queue(&channel, exchange, queue, Duration::from_secs(expires_secs))
            .await?;
        let _ = conn.close(200, "done".into()).await;
        anyhow::Ok(())
    })
}

/// Waits until `queue` holds `expect` messages (or `within_secs` passes),
/// prints `RESULT mode=queue delivered=N`, then deletes the queue.
pub fn queue_count(
    queue: &str,
    expect: u64,
    within_secs: u64,
    amqp_uri: &str,
) -> anyhow::Result<()> {
    check_loopback_amqp(amqp_uri)?;
    let rt = client::runtime(1)?;
    rt.block_on(async {
        let (conn, channel) = amqp::connect(amqp_uri, "loadgen-queue").await?;
        let delivered = amqp::settle(
            &channel,
            queue,
            expect,
            Duration::from_millis(500),
            Duration::from_secs(within_secs),
        )
        .await?;
        amqp::delete_queue(&channel, queue).await;
        let _ = conn.close(200, "done".into()).await;
        ResultLine::new("queue").int("delivered", delivered).print();
        anyhow::Ok(())
    })
}

/// Prints `count` free loopback TCP ports (bound together, then released).
pub fn free_port(count: usize) -> anyhow::Result<()> {
    let listeners: Vec<std::net::TcpListener> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    for l in &listeners {
        println!("{}", l.local_addr()?.port());
    }
    Ok(())
}

/// Deletes an exchange and/or the Redis keys under a prefix.
pub fn cleanup(
    exchange: Option<String>,
    redis_prefix: Option<String>,
    amqp_uri: String,
    redis_url: String,
) -> anyhow::Result<()> {
    check_loopback_amqp(&amqp_uri)?;
    let rt = client::runtime(1)?;
    rt.block_on(cleanup_async(exchange, redis_prefix, amqp_uri, redis_url))
}

async fn cleanup_async(
    exchange: Option<String>,
    redis_prefix: Option<String>,
    amqp_uri: String,
    redis_url: String,
) -> anyhow::Result<()> {
    if let Some(exchange) = exchange {
        let (conn, channel) = amqp::connect(&amqp_uri, "loadgen-cleanup").await?;
        amqp::delete_exchange(&channel, &exchange).await?;
        let _ = conn.close(200, "done".into()).await;
        println!("deleted exchange {exchange}");
    }
    if let Some(prefix) = redis_prefix {
        if prefix.is_empty() || prefix.contains(['*', '?', '[']) {
            bail!("refusing to delete by prefix {prefix:?}");
        }
        let client = redis::Client::open(redis_url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut cursor: u64 = 0;
        let mut deleted = 0usize;
        // Bounded: SCAN terminates when the cursor returns to 0.
        for _ in 0..10_000_000u64 {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                deleted += keys.len();
                let _: () = redis::cmd("DEL").arg(keys).query_async(&mut conn).await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        println!("deleted {deleted} Redis keys under {prefix}");
    }
    Ok(())
}
