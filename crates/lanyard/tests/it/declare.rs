//! `lanyard plan|apply` against a real server.
