"""The E2EE crypto state of the bridge's devices in its database (issue 16 point 2).

- `store`: the matrix-nio store a device's client uses: answers from a snapshot read
  before the client is built, journals every write (no I/O in nio's synchronous calls).
- `journal`: when the journal is written (before anything encrypted leaves, after
  to-device events are handled) and what nio does not persist that the bridge does
  (outbound Megolm sessions, tracked users).
- `legacy`: moving the per-device files of `appservice.store_dir` into the database.
"""
