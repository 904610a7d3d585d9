"""The coordinator's work, one module a role: buyers' submissions, leases and dispatch's queue, nodes'
reports, node accounts and standing, verification, sweeps' trials, uploads, inference accounting,
admission. Services open transactions, decide through the domain and queue effects for the
transport; they never reach a socket."""
