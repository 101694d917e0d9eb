//! MQTT ingest from the plant's broker: an MQTT 3.1.1 subscriber built on rumqttc's packet
//! codec, with a loop of its own so that acknowledgements keep up with a full-speed stream.
//!
//! The session is persistent (clean session off) and subscriptions are QoS 1. A PUBACK goes
//! out only after the writer has committed the message's readings (or its dead letter);
//! every PUBACK waiting is written in one go. (rumqttc's event loop sends one request per
//! poll while it reads up to ten messages, so under load its manual acks fell thousands of
//! messages behind: memory grew and every crash meant a storm of redeliveries.)
//!
//! If the agent dies between commit and PUBACK, the broker redelivers the message with DUP
//! set, and the writer recognises it. Acks are tagged with the connection they belong to:
//! one left over from a lost connection is dropped, never sent on the next, where its packet
//! id may already name another message.
//!
//! Lost connections are retried with exponential backoff (200 ms to 30 s), reset by every
//! successful connection.
//!
//! [`state`] is the session without I/O (ack batching, connection generations,
//! ping-confirmed redelivery records, keep-alive, all given the time); [`eventloop`] is the
//! thin loop that moves its bytes over TCP.

mod eventloop;
mod state;

pub use eventloop::run;
