//! Slow or retryable work leaves the hot path through RabbitMQ, as the platform prescribes:
//! [`topology`] declares its exchanges and queues, [`publisher`] sends tasks to them.

pub mod publisher;
pub mod topology;
