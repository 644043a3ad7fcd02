//! `lanyard exception`, `lanyard grant` and entry writes under the policy, against a real server.
