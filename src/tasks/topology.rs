//! The platform's RabbitMQ topology (NileCare): direct exchanges per channel, durable queues
//! with priorities 0–10 whose rejected or expired messages go to the dead-letter exchange.
//! Declaring is idempotent: every start declares it all again, with the same arguments.
//!
//! Retries wait in delay queues, one per delay (`retry.<ms>ms`, fed by a fanout exchange
//! of the same name): a message there expires after its delay and is dead-lettered to
//! `nilecare.requeue`, which routes it by its original routing key back to its task queue.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

/// Where failed jobs go, and the one queue they land in.
pub const DEAD_LETTER_EXCHANGE: &str = "nilecare.dlq";
pub const FAILED_JOBS: &str = "failed.jobs";

/// The highest priority a task queue orders by.
pub const MAX_PRIORITY: u8 = 10;

/// Each exchange and the queues bound to it (the routing key is the queue's name). The
/// webhook exchange is ours, beside the platform's.
pub const EXCHANGES: [(&str, &[&str]); 4] = [
    ("nilecare.sms", &["sms.urgent", "sms.normal"]),
    (
        "nilecare.email",
        &["email.high", "email.normal", "email.low"],
    ),
    ("nilecare.webhook", &["webhook.urgent", "webhook.normal"]),
    ("nilecare.reports", &["reports.pdf", "reports.excel"]),
];

/// Where retried messages go back to their task queues from.
pub const REQUEUE_EXCHANGE: &str = "nilecare.requeue";

/// The exchange (and queue) a retry waits `delay` in.
pub fn retry_exchange(delay: std::time::Duration) -> String {
    format!("retry.{}ms", delay.as_millis())
}

/// The arguments of every task queue.
pub fn task_queue_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-max-priority".into(),
        AMQPValue::ShortShortUInt(MAX_PRIORITY),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(DEAD_LETTER_EXCHANGE)),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(FAILED_JOBS)),
    );
    args
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

/// Declares every exchange, queue and binding; safe to run again.
pub async fn declare(channel: &Channel) -> lapin::Result<()> {
    channel
        .exchange_declare(
            DEAD_LETTER_EXCHANGE.into(),
            ExchangeKind::Direct,
            durable_exchange(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            FAILED_JOBS.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            FAILED_JOBS.into(),
            DEAD_LETTER_EXCHANGE.into(),
            FAILED_JOBS.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    for (exchange, queues) in EXCHANGES {
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Direct,
                durable_exchange(),
                FieldTable::default(),
            )
            .await?;
        for queue in queues {
            channel
                .queue_declare(
                    (*queue).into(),
                    QueueDeclareOptions::durable(),
                    task_queue_arguments(),
                )
                .await?;
            channel
                .queue_bind(
                    (*queue).into(),
                    exchange.into(),
                    (*queue).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
    Ok(())
}

/// Declares the requeue exchange and a delay queue for each retry delay; safe to run again.
pub async fn declare_retries(
    channel: &Channel,
    delays: &[std::time::Duration],
) -> lapin::Result<()> {
    channel
        .exchange_declare(
            REQUEUE_EXCHANGE.into(),
            ExchangeKind::Direct,
            durable_exchange(),
            FieldTable::default(),
        )
        .await?;
    for queue in EXCHANGES.iter().flat_map(|(_, queues)| queues.iter()) {
        channel
            .queue_bind(
                (*queue).into(),
                REQUEUE_EXCHANGE.into(),
                (*queue).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    for delay in delays {
        let name = retry_exchange(*delay);
        channel
            .exchange_declare(
                name.as_str().into(),
                ExchangeKind::Fanout,
                durable_exchange(),
                FieldTable::default(),
            )
            .await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(delay.as_millis() as i64),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(REQUEUE_EXCHANGE)),
        );
        channel
            .queue_declare(name.as_str().into(), QueueDeclareOptions::durable(), args)
            .await?;
        channel
            .queue_bind(
                name.as_str().into(),
                name.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}
