"""The server role: validate and merge device deltas, keep every prototype version, publish the
newest one retained. numpy, paho-mqtt and sqlite3 only (never torch).

    merge    the merge rule, pure functions over arrays (no I/O)
    store    durable versions and the (device, seq) dedup set behind a small interface (SQLite)
    service  the MQTT process: callbacks enqueue, one owner loop merges every few seconds
"""
