//! `lanyard report` on a seeded datastore.
