"""The wire contract between worker and hub, shared by both and depending on neither.

`emp_protocol.messages`: the WebSocket messages; `emp_protocol.jobs`: job statuses and
output references; `emp_protocol.capabilities`: what a job needs, what a worker offers, and
the predicate that matches them; `emp_protocol.logs`: the log line formats both sides
write (EMP_LOG_FORMAT) and the redaction of secrets in them. See docs/protocol.md and
docs/architecture.md.
"""
