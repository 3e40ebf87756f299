//! Slow or retryable work leaves the hot path through RabbitMQ, as the platform prescribes:
//! [`topology`] declares its exchanges and queues, [`policy`] turns alerts into notification
//! tasks, [`escalation`] notifies wider audiences while an alert stays unacknowledged,
//! [`publisher`] sends tasks to the queues, and the [`notifier`] runs it all for a service;
//! the [`worker`] takes the tasks off the queues and delivers them.

pub mod escalation;
pub mod notifier;
pub mod policy;
pub mod publisher;
pub mod report;
pub mod topology;
pub mod worker;
