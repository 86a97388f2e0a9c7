//! One integration-test binary. Every test talks to the real simulator and the real proxy over
//! real sockets on 127.0.0.1 port 0; nothing touches the internet or a fixed port.

mod support;

mod apps;
mod budget;
mod chaos;
mod cli;
mod cluster;
mod credentials;
mod egress;
mod genesys_limits;
mod hardening;
mod issuer_answers;
mod jwks;
mod listener_tls;
mod oauth;
mod observability;
mod proxy;
mod redis_faults;
mod replay;
mod rotation;
mod rotation_load;
mod sdk;
mod settle;
mod sim;
mod tls;
mod tracing;
mod upstream_pool;
mod workload;
