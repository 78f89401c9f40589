#!/usr/bin/env python3
"""An echo agent for mailbox-sidecar, speaking the agent protocol directly.

It needs Python 3.8 or later and nothing beyond the standard library. The
protocol it speaks is described in docs/protocol.md; this file is a worked
example of that document, not a library.

What the agent does with a run (RUN frame):

* emits ``{"type":"run_start",...}``;
* for every activation message with text content emits
  ``{"type":"text_delta","delta":"echo: <text>"}``;
* acts on control words in that text:
  ``sleep <ms>``      sleeps (cancellable; live messages that arrive meanwhile
                      are echoed as ``live: <text>``),
  ``fail transient``  ends the run with FINISH error kind transient,
  ``fail permanent``  ends the run with FINISH error kind permanent;
* sends one CHECKPOINT with one assistant message holding its reply and waits
  for CHECKPOINT_ACK (or ERROR carrying that seq);
* emits ``{"type":"run_finish",...}`` and sends FINISH (status done,
  termination natural_end, response = the reply).

CANCEL ends the run at its next step boundary with termination cancelled.
MESSAGES are accepted while the run can still act on them. A live DECISION is
always refused (``accepted: false``): the protocol accepts one only for a tool
call the run has suspended, and this agent calls no tools. Decisions a RUN
carries (``request.decisions``, a resumed run) are echoed.

Usage::

    python3 agent.py [--socket PATH] [--max-runs N] [--once] [--verbose]

Environment:

    MAILBOX_AGENT_SOCKET  socket path when --socket is not given
                          (default ./run/agent.sock)

Exit status: 0 after a graceful shutdown (SIGTERM, SIGINT, or --once), 2 when
the sidecar speaks an unsupported protocol version, 1 on a usage error.

Threads: the main thread connects and reads frames; each run executes on its
own thread; one ticker thread per connection sends heartbeats, watches for a
silent sidecar and closes the connection when draining is done. Every write
to the socket goes through ``Session.send`` under one lock, so frames never
interleave. Lock order: ``Run._cond`` before ``Session._write_lock``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

log = logging.getLogger("python-agent")

# ---------------------------------------------------------------------------
# Wire constants (docs/protocol.md, "Framing" and "Frame types")
# ---------------------------------------------------------------------------

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">IBBHQ")  # length, type, flags, reserved, stream
HEADER_SIZE = HEADER.size  # 16
DEFAULT_MAX_FRAME = 16 << 20
PING_SIZE = 8

HELLO = 0x01
WELCOME = 0x02
PING = 0x03
PONG = 0x04
GOAWAY = 0x05
ERROR = 0x06
RUN = 0x10
EVENT = 0x11
CHECKPOINT = 0x12
CHECKPOINT_ACK = 0x13
FINISH = 0x14
CANCEL = 0x20
MESSAGES = 0x21
DECISION = 0x22
COMMAND_ACK = 0x23
SUBMIT = 0x30
SUBMIT_RESULT = 0x31

FRAME_NAMES = {
    HELLO: "HELLO", WELCOME: "WELCOME", PING: "PING", PONG: "PONG",
    GOAWAY: "GOAWAY", ERROR: "ERROR", RUN: "RUN", EVENT: "EVENT",
    CHECKPOINT: "CHECKPOINT", CHECKPOINT_ACK: "CHECKPOINT_ACK",
    FINISH: "FINISH", CANCEL: "CANCEL", MESSAGES: "MESSAGES",
    DECISION: "DECISION", COMMAND_ACK: "COMMAND_ACK", SUBMIT: "SUBMIT",
    SUBMIT_RESULT: "SUBMIT_RESULT",
}
# Frame types the sidecar may send to an agent.
FROM_SIDECAR = {WELCOME, PING, PONG, GOAWAY, ERROR, RUN, CHECKPOINT_ACK,
                CANCEL, MESSAGES, DECISION, SUBMIT_RESULT}
# Frame types that live on stream 0 only; the run types never do. ERROR may
# be on either.
STREAM0_TYPES = {HELLO, WELCOME, PING, PONG, GOAWAY, SUBMIT, SUBMIT_RESULT}
OPAQUE_TYPES = {PING, PONG}

# Timing (seconds unless named otherwise).
HANDSHAKE_TIMEOUT = 10.0      # sidecar must answer HELLO with WELCOME
DEFAULT_HEARTBEAT_MS = 5000   # used when WELCOME carries none
CHECKPOINT_TIMEOUT = 30.0     # give up on a CHECKPOINT_ACK after this
BACKOFF_BASE = 0.1            # reconnect backoff: base, doubled per failure
BACKOFF_MAX = 5.0             # ... capped here, with 50-100 % jitter
STABLE_SESSION = 5.0          # a session this long resets the backoff
POLL = 0.05                   # how often flag-only waits look again


def backoff_delay(failures: int) -> float:
    """Return the delay before reconnect number ``failures`` (1-based):
    exponential from BACKOFF_BASE, capped at BACKOFF_MAX, with jitter so a
    fleet of agents does not reconnect in lockstep."""
    ceiling = min(BACKOFF_MAX, BACKOFF_BASE * (2 ** min(max(failures - 1, 0), 16)))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class ProtocolError(Exception):
    """The sidecar broke the protocol: answer ERROR protocol_error, close."""


class ConnectionLost(Exception):
    """The connection is gone (closed, reset, or closed by us)."""


class Unsupported(Exception):
    """The sidecar refused our protocol version; retrying will not help."""


class Cancelled(Exception):
    """The run was cancelled by a CANCEL frame."""


class RunFailed(Exception):
    """The run ends with a FINISH carrying ``error`` {kind, code, message}."""

    def __init__(self, kind: str, code: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------


def encode_frame(ftype: int, stream: int, payload: bytes) -> bytes:
    """Return one frame: the 16-byte header followed by ``payload``."""
    return HEADER.pack(len(payload), ftype, 0, 0, stream) + payload


def dumps(obj: Any) -> bytes:
    """Encode a JSON payload compactly as UTF-8."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class FrameReader:
    """Reassembles frames from a socket. One thread reads a connection."""

    def __init__(self, sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._sock = sock
        self._buf = bytearray()
        self.max_frame = max_frame

    def _fill(self, n: int) -> bool:
        """Buffer at least ``n`` bytes. Return False on EOF with nothing
        buffered; raise ConnectionLost on EOF inside a frame."""
        while len(self._buf) < n:
            try:
                chunk = self._sock.recv(max(65536, n - len(self._buf)))
            except socket.timeout:
                raise
            except OSError as exc:
                raise ConnectionLost("read: %s" % exc) from exc
            if not chunk:
                if not self._buf:
                    return False
                raise ConnectionLost("connection closed inside a frame")
            self._buf += chunk
        return True

    def read(self) -> Optional[Tuple[int, int, bytes]]:
        """Return the next frame as (type, stream, payload), or None at a
        clean end of stream. Raises ProtocolError for a frame that breaks the
        framing rules (unknown type, reserved bits, too long, not JSON)."""
        if not self._fill(HEADER_SIZE):
            return None
        length, ftype, _flags, reserved, stream = HEADER.unpack_from(self._buf, 0)
        if ftype not in FRAME_NAMES:
            raise ProtocolError("unknown frame type 0x%02x" % ftype)
        if reserved != 0:
            raise ProtocolError("reserved header field is 0x%04x" % reserved)
        if length > self.max_frame:
            raise ProtocolError("%s payload of %d bytes exceeds %d"
                                % (FRAME_NAMES[ftype], length, self.max_frame))
        if not self._fill(HEADER_SIZE + length):
            raise ConnectionLost("connection closed inside a frame")
        payload = bytes(self._buf[HEADER_SIZE:HEADER_SIZE + length])
        del self._buf[:HEADER_SIZE + length]
        return ftype, stream, payload


def parse_object(ftype: int, payload: bytes) -> Dict[str, Any]:
    """Decode a JSON-object payload or raise ProtocolError."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: nested deeper than Python decodes (the sidecar
        # refuses fields deeper than 100 levels; this guards the agent).
        raise ProtocolError("%s payload is not JSON: %s" % (FRAME_NAMES[ftype], exc)) from exc
    if not isinstance(obj, dict):
        raise ProtocolError("%s payload is not a JSON object" % FRAME_NAMES[ftype])
    return obj


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------


def message_text(message: Any) -> Optional[str]:
    """Return the text of a Message, or None when it has no text content.

    Content is opaque JSON to the sidecar. This agent understands a plain
    string and a list of parts, where a part is a string or an object
    ``{"type":"text","text":"..."}``.
    """
    if not isinstance(message, dict):
        return None
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif (isinstance(part, dict) and part.get("type", "text") == "text"
                  and isinstance(part.get("text"), str)):
                parts.append(part["text"])
        if parts:
            return "".join(parts)
    return None


def assistant_message(text: str) -> Dict[str, Any]:
    """Return an assistant Message with one text part. The id is left blank:
    the sidecar assigns one when it appends the message."""
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------


class Run:
    """One RUN: executes on its own thread, talks through its Session.

    The reader thread hands it commands (cancel, offer, checkpoint results);
    the run thread consumes them. Everything shared is guarded by ``_cond``.
    """

    def __init__(self, session: "Session", stream: int, payload: Dict[str, Any]) -> None:
        self.session = session
        self.stream = stream
        self.payload = payload
        self.run_id = str(payload.get("run_id", ""))
        self.thread_id = str(payload.get("thread_id", ""))
        self.thread = threading.Thread(target=self._main, name="run-%d" % stream, daemon=True)

        self._cond = threading.Condition()
        # Guarded by _cond:
        self._cancelled = False
        self._lost = False          # the connection is gone: send nothing more
        self._accepting = True      # live messages still usable
        self._finished = False      # FINISH is being sent: ignore commands
        self._inbox: List[Any] = []  # live MessageRecords accepted, not yet answered
        self._checkpoints: Dict[int, Optional[Dict[str, Any]]] = {}
        self._next_seq = 1

    # -- called by the reader thread -------------------------------------

    def command(self, ftype: int, body: Dict[str, Any]) -> None:
        """Handle CANCEL, MESSAGES or DECISION and answer COMMAND_ACK.

        The ack is sent while ``_cond`` is held, so it reaches the wire
        before the run's FINISH (which the run sends only after marking
        itself finished under the same lock)."""
        cmd = body.get("cmd")
        with self._cond:
            if self._finished or self._lost:
                log.debug("stream %d: %s after FINISH ignored", self.stream, FRAME_NAMES[ftype])
                return
            ack: Dict[str, Any] = {"cmd": cmd, "accepted": True}
            ack_by = body.get("ack_by")
            if ftype == CANCEL:
                self._cancelled = True
            else:
                key = "messages" if ftype == MESSAGES else "decisions"
                items = body.get(key)
                if isinstance(ack_by, int) and ack_by > 0 and time.time() * 1000 > ack_by:
                    # Read after its ack was due: the sidecar may have
                    # queued the messages as a new dispatch already.
                    ack = {"cmd": cmd, "accepted": False, "reason": "late"}
                elif not isinstance(items, list):
                    ack = {"cmd": cmd, "accepted": False, "reason": "%s is not a list" % key}
                elif ftype == DECISION:
                    # Accepted only for a tool call this run has suspended
                    # (docs/protocol.md, "Live commands"); this agent never
                    # suspends one.
                    calls = ", ".join(str(d.get("call_id")) if isinstance(d, dict) else "?"
                                      for d in items)
                    ack = {"cmd": cmd, "accepted": False,
                           "reason": "no suspended tool call %s in this run (this agent calls no tools)"
                                     % (calls or "(none named)")}
                elif self._cancelled or not self._accepting:
                    ack = {"cmd": cmd, "accepted": False, "reason": "run is finishing"}
                else:
                    self._inbox.extend(items)
            self._cond.notify_all()
            try:
                self.session.send_json(COMMAND_ACK, self.stream, ack)
            except ConnectionLost:
                pass

    def checkpoint_result(self, seq: int, error: Optional[Dict[str, Any]]) -> None:
        """Deliver CHECKPOINT_ACK (error None) or ERROR for checkpoint seq."""
        with self._cond:
            if seq in self._checkpoints and self._checkpoints[seq] is None:
                self._checkpoints[seq] = error if error is not None else {}
                self._cond.notify_all()
            else:
                log.warning("stream %d: result for unknown checkpoint seq %d", self.stream, seq)

    def connection_lost(self) -> None:
        """The connection dropped: the run stops and sends nothing more.
        (The sidecar fails the attempt as transient and retries it.)"""
        with self._cond:
            self._lost = True
            self._cond.notify_all()

    # -- the run thread ---------------------------------------------------

    def _main(self) -> None:
        log.info("run start stream=%d run_id=%s thread_id=%s attempt=%s session_id=%s",
                 self.stream, self.run_id, self.thread_id,
                 self.payload.get("attempt"), self.payload.get("session_id"))
        try:
            self._execute()
        except ConnectionLost:
            log.info("run abandoned stream=%d run_id=%s: connection lost", self.stream, self.run_id)
        except Exception as exc:  # a bug in the agent: a transient failure
            log.exception("run stream=%d failed", self.stream)
            try:
                self._finish({"status": "done", "termination": {"type": "error", "value": str(exc)},
                              "error": {"kind": "transient", "code": "agent_exception",
                                        "message": str(exc)}})
            except ConnectionLost:
                pass
        finally:
            self.session.run_ended(self)

    def _execute(self) -> None:
        request = self.payload.get("request") or {}
        replies: List[str] = []
        self._emit({"type": "run_start", "run_id": self.run_id, "thread_id": self.thread_id})
        try:
            for decision in request.get("decisions") or []:
                self._decision(decision, replies)
            for message in request.get("messages") or []:
                self._step_boundary(replies)
                text = message_text(message)
                if text is None:
                    continue
                self._say("echo: " + text, replies)
                self._control(text, replies)
            self._step_boundary(replies)
            # The last step: take no more live input, then answer what came.
            with self._cond:
                self._accepting = False
            self._drain(replies)
            reply = "\n".join(replies)
            if reply:
                self._checkpoint([assistant_message(reply)], {"steps": 1})
        except Cancelled:
            termination = {"type": "cancelled"}
            self._emit({"type": "run_finish", "run_id": self.run_id, "termination": termination})
            self._finish({"status": "done", "termination": termination})
            return
        except RunFailed as failure:
            # No run_finish event: the sidecar closes the client's stream
            # itself when an attempt fails (it may be retried).
            self._finish({"status": "done",
                          "termination": {"type": "error", "value": failure.message},
                          "error": {"kind": failure.kind, "code": failure.code,
                                    "message": failure.message}})
            return
        termination = {"type": "natural_end"}
        self._emit({"type": "run_finish", "run_id": self.run_id, "termination": termination})
        self._finish({"status": "done", "termination": termination, "response": reply})

    def _control(self, text: str, replies: List[str]) -> None:
        """Act on a control word in an activation message."""
        words = text.strip().split()
        if len(words) == 2 and words[0] == "sleep" and words[1].isdigit():
            self._sleep(int(words[1]) / 1000.0, replies)
        elif words == ["fail", "transient"]:
            raise RunFailed("transient", "requested_failure", "the message asked for a transient failure")
        elif words == ["fail", "permanent"]:
            raise RunFailed("permanent", "requested_failure", "the message asked for a permanent failure")

    def _say(self, line: str, replies: List[str]) -> None:
        """Stream one line of the reply and keep it for the checkpoint."""
        self._emit({"type": "text_delta", "delta": line})
        replies.append(line)

    def _decision(self, decision: Any, replies: List[str]) -> None:
        """Echo a tool-call decision the RUN carries (this agent calls no
        tools, so it only reports it)."""
        if isinstance(decision, dict):
            self._say("decision %s: %s" % (decision.get("call_id"),
                                            json.dumps(decision.get("resume"))), replies)

    def _check(self) -> None:
        """Raise when the run must stop. Call with ``_cond`` held."""
        if self._lost:
            raise ConnectionLost("connection lost")
        if self._cancelled:
            raise Cancelled()

    def _step_boundary(self, replies: List[str]) -> None:
        """A step boundary: stop if cancelled, else use live input."""
        with self._cond:
            self._check()
        self._drain(replies)

    def _drain(self, replies: List[str]) -> None:
        """Answer the live messages accepted so far. They are already in the
        thread log, so they are never checkpointed again; only this agent's
        answers to them are."""
        with self._cond:
            inbox, self._inbox = self._inbox, []
        for item in inbox:
            record = item if isinstance(item, dict) else {}
            text = message_text(record.get("message"))
            if text is not None:
                self._say("live: " + text, replies)

    def _sleep(self, seconds: float, replies: List[str]) -> None:
        """Sleep, waking for cancellation and live input."""
        deadline = time.monotonic() + seconds
        while True:
            with self._cond:
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait_for(lambda: self._lost or self._cancelled or bool(self._inbox),
                                        timeout=remaining)
                self._check()
            self._drain(replies)
            if time.monotonic() >= deadline:
                return

    def _checkpoint(self, messages: List[Dict[str, Any]], run: Dict[str, Any]) -> None:
        """Send CHECKPOINT and wait until it is durable (CHECKPOINT_ACK).
        An ERROR for it, or no answer in time, fails the run as transient.
        Cancellation does not interrupt the wait: the checkpoint is applied
        either way, and the run ends right after it."""
        with self._cond:
            seq = self._next_seq
            self._next_seq += 1
            self._checkpoints[seq] = None
        self.session.send_json(CHECKPOINT, self.stream,
                               {"seq": seq, "messages": messages, "run": run})
        with self._cond:
            done = self._cond.wait_for(lambda: self._lost or self._checkpoints[seq] is not None,
                                       timeout=CHECKPOINT_TIMEOUT)
            if self._lost:
                raise ConnectionLost("connection lost")
            result = self._checkpoints.pop(seq)
        if not done:
            raise RunFailed("transient", "checkpoint_timeout",
                            "no CHECKPOINT_ACK for seq %d in %.0f s" % (seq, CHECKPOINT_TIMEOUT))
        if result:  # an ERROR frame; its "reason" says why (docs/protocol.md)
            raise RunFailed("transient", str(result.get("code") or "checkpoint_failed"),
                            "%s (reason %s)" % (result.get("message") or "checkpoint failed",
                                                result.get("reason") or "internal"))

    def _emit(self, event: Dict[str, Any]) -> None:
        """Send one EVENT (a JSON object with a "type")."""
        with self._cond:
            if self._lost:
                raise ConnectionLost("connection lost")
        self.session.send_json(EVENT, self.stream, event)

    def _finish(self, body: Dict[str, Any]) -> None:
        """Send FINISH; after it the stream is closed and commands for it
        are ignored."""
        with self._cond:
            if self._lost:
                raise ConnectionLost("connection lost")
            self._finished = True
        self.session.send_json(FINISH, self.stream, body)
        log.info("run finish stream=%d run_id=%s termination=%s error=%s", self.stream, self.run_id,
                 (body.get("termination") or {}).get("type"), (body.get("error") or {}).get("kind"))


# ---------------------------------------------------------------------------
# Connection
# ---------------------------------------------------------------------------


class Session:
    """One connection to the sidecar, from HELLO to close."""

    def __init__(self, agent: "Agent", sock: socket.socket) -> None:
        self.agent = agent
        self.sock = sock
        self.reader = FrameReader(sock)
        self.heartbeat = DEFAULT_HEARTBEAT_MS / 1000.0
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self.ran_any = False

        self._write_lock = threading.Lock()  # serialises socket writes
        self._close_lock = threading.Lock()  # makes close() idempotent
        self._closed = threading.Event()     # set once close() began
        self._last_sent = time.monotonic()   # written under _write_lock
        self._last_recv = time.monotonic()   # written by the reader thread only

        self._runs_lock = threading.Lock()
        self._runs: Dict[int, Run] = {}      # guarded by _runs_lock
        self._last_stream = 0                # reader thread only
        self._goaway_received = False        # the sidecar said GOAWAY
        self._goaway_sent_at: Optional[float] = None  # ticker thread only

    # -- writing ----------------------------------------------------------

    def send(self, ftype: int, stream: int, payload: bytes, wait: bool = True) -> bool:
        """Write one whole frame. Raises ConnectionLost when the connection
        is gone (the caller stops; the sidecar retries its runs). With
        wait=False nothing is written, and False returned, while another
        thread is writing: the ticker must never queue behind a write that
        a sidecar which stopped reading will not let finish, or nobody is
        left to notice that the sidecar is dead."""
        if len(payload) > self.peer_max_frame:
            raise ValueError("%s payload of %d bytes exceeds the sidecar's max_frame %d"
                             % (FRAME_NAMES[ftype], len(payload), self.peer_max_frame))
        frame = encode_frame(ftype, stream, payload)
        if not self._write_lock.acquire(blocking=wait):
            return False
        try:
            if self._closed.is_set():
                raise ConnectionLost("connection closed")
            try:
                self.sock.sendall(frame)
            except OSError as exc:
                raise ConnectionLost("write %s: %s" % (FRAME_NAMES[ftype], exc)) from exc
            self._last_sent = time.monotonic()
        finally:
            self._write_lock.release()
        return True

    def send_json(self, ftype: int, stream: int, obj: Dict[str, Any], wait: bool = True) -> bool:
        """Write one frame with a JSON object payload."""
        return self.send(ftype, stream, dumps(obj), wait)

    def _try_send_json(self, ftype: int, stream: int, obj: Dict[str, Any], wait: bool = True) -> bool:
        """Best-effort send (ERROR before closing, GOAWAY); whether it was
        written."""
        try:
            return self.send_json(ftype, stream, obj, wait)
        except (ConnectionLost, ValueError):
            return False

    # -- lifecycle --------------------------------------------------------

    def handshake(self) -> None:
        """Send HELLO and wait for WELCOME."""
        self.sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            self.send_json(HELLO, 0, {"protocol": PROTOCOL_VERSION, "name": "python-agent",
                                      "agent_ids": ["*"], "max_runs": self.agent.max_runs})
            frame = self.reader.read()
        except socket.timeout as exc:
            raise ConnectionLost("no WELCOME within %.0f s" % HANDSHAKE_TIMEOUT) from exc
        self.sock.settimeout(None)
        if frame is None:
            raise ConnectionLost("sidecar closed the connection during the handshake")
        ftype, stream, payload = frame
        if ftype == ERROR:
            status = parse_object(ftype, payload)
            if status.get("code") == "unsupported_protocol":
                raise Unsupported(str(status.get("message") or "unsupported protocol"))
            raise ConnectionLost("handshake refused: %s %s" % (status.get("code"), status.get("message")))
        if ftype != WELCOME or stream != 0:
            raise ProtocolError("expected WELCOME on stream 0, got %s on stream %d"
                                % (FRAME_NAMES[ftype], stream))
        welcome = parse_object(ftype, payload)
        if welcome.get("protocol") != PROTOCOL_VERSION:
            raise Unsupported("sidecar speaks protocol %r" % welcome.get("protocol"))
        hb = welcome.get("heartbeat_ms")
        if isinstance(hb, int) and hb > 0:
            self.heartbeat = hb / 1000.0
        mf = welcome.get("max_frame")
        if isinstance(mf, int) and mf > 0:
            self.peer_max_frame = mf
            self.reader.max_frame = max(DEFAULT_MAX_FRAME, mf)
        self._last_recv = time.monotonic()
        log.info("connected sidecar_id=%s heartbeat_ms=%d", welcome.get("sidecar_id"),
                 int(self.heartbeat * 1000))

    def serve(self) -> None:
        """Read and handle frames until the connection ends, then stop every
        run and release the connection. Returns normally in every case
        except Unsupported."""
        ticker = threading.Thread(target=self._tick, name="ticker", daemon=True)
        try:
            self.handshake()
            ticker.start()
            while True:
                frame = self.reader.read()
                if frame is None:
                    if not self._closed.is_set():
                        log.info("sidecar closed the connection")
                    break
                self._last_recv = time.monotonic()
                self._handle(*frame)
        except ProtocolError as exc:
            log.error("protocol error: %s", exc)
            self._try_send_json(ERROR, 0, {"code": "protocol_error", "message": str(exc)})
        except ConnectionLost as exc:
            log.info("connection lost: %s", exc)
        finally:
            self.close()
            if ticker.is_alive():
                ticker.join()
            for run in self.runs():
                run.thread.join()
            self.sock.close()

    def close(self) -> None:
        """Shut the connection down (idempotent). This wakes the reader and
        any writer blocked on a full socket buffer, so it does not take the
        write lock; the descriptor itself is closed by serve() once every
        thread has let go of it. Runs still executing are told the
        connection is lost: a dropped connection cancels them all."""
        with self._close_lock:
            if self._closed.is_set():
                return
            self._closed.set()
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for run in self.runs():
            run.connection_lost()

    def runs(self) -> List[Run]:
        """The runs executing now."""
        with self._runs_lock:
            return list(self._runs.values())

    def run_ended(self, run: Run) -> None:
        """Called by a run thread when it is done."""
        with self._runs_lock:
            self._runs.pop(run.stream, None)
        self.agent.run_completed()

    def draining(self) -> bool:
        """Whether either side said GOAWAY: no new runs on this connection."""
        return self._goaway_received or self._goaway_sent_at is not None

    # -- reading ----------------------------------------------------------

    def _handle(self, ftype: int, stream: int, payload: bytes) -> None:
        """Dispatch one frame from the sidecar."""
        name = FRAME_NAMES[ftype]
        if ftype not in FROM_SIDECAR:
            raise ProtocolError("%s is an agent-to-sidecar frame" % name)
        if ftype in STREAM0_TYPES and stream != 0:
            raise ProtocolError("%s on run stream %d" % (name, stream))
        if ftype not in STREAM0_TYPES and ftype != ERROR and stream == 0:
            raise ProtocolError("%s on stream 0" % name)
        if ftype == PING:
            if len(payload) != PING_SIZE:
                raise ProtocolError("PING payload of %d bytes, want %d" % (len(payload), PING_SIZE))
            self.send(PONG, 0, payload)
            return
        if ftype == PONG:
            if len(payload) != PING_SIZE:
                raise ProtocolError("PONG payload of %d bytes, want %d" % (len(payload), PING_SIZE))
            return
        body = parse_object(ftype, payload)
        if ftype == WELCOME:
            raise ProtocolError("second WELCOME")
        if ftype == GOAWAY:
            log.info("sidecar GOAWAY code=%s: finishing %d run(s), then reconnecting",
                     body.get("code"), len(self.runs()))
            self._goaway_received = True
        elif ftype == ERROR:
            self._handle_error(stream, body)
        elif ftype == RUN:
            self._start_run(stream, body)
        elif ftype == SUBMIT_RESULT:
            log.info("SUBMIT_RESULT %s", body)  # this agent sends no SUBMIT
        else:
            run = self._run(stream)
            if run is None:
                # The run ended (we sent FINISH) while the frame was on its way.
                log.debug("%s for closed stream %d ignored", name, stream)
            elif ftype == CHECKPOINT_ACK:
                seq = body.get("seq")
                if not isinstance(seq, int):
                    raise ProtocolError("CHECKPOINT_ACK without an integer seq")
                run.checkpoint_result(seq, None)
            else:
                run.command(ftype, body)

    def _handle_error(self, stream: int, status: Dict[str, Any]) -> None:
        """ERROR on stream 0: the sidecar is closing the connection. On a run
        stream it rejects one frame; with a seq it fails that checkpoint."""
        if stream == 0:
            log.error("sidecar error code=%s message=%s", status.get("code"), status.get("message"))
            return
        run = self._run(stream)
        seq = status.get("seq")
        if run is not None and isinstance(seq, int):
            run.checkpoint_result(seq, status)
        else:
            log.warning("stream %d: sidecar rejected a frame: code=%s message=%s",
                        stream, status.get("code"), status.get("message"))

    def _run(self, stream: int) -> Optional[Run]:
        with self._runs_lock:
            return self._runs.get(stream)

    def _start_run(self, stream: int, body: Dict[str, Any]) -> None:
        """Start a RUN on its own thread."""
        if stream <= self._last_stream:
            raise ProtocolError("RUN reuses stream %d" % stream)
        self._last_stream = stream
        run = Run(self, stream, body)
        if self.draining():
            # The sidecar should not send RUN after GOAWAY; hand it back to
            # be retried rather than start work we are about to abandon.
            self.send_json(FINISH, stream, {
                "status": "done",
                "termination": {"type": "error", "value": "agent is draining"},
                "error": {"kind": "transient", "code": "agent_draining",
                          "message": "RUN received after GOAWAY"}})
            return
        with self._runs_lock:
            if len(self._runs) >= self.agent.max_runs:
                log.warning("sidecar sent more than max_runs=%d runs", self.agent.max_runs)
            self._runs[stream] = run
        self.ran_any = True
        run.thread.start()

    # -- heartbeats and draining ------------------------------------------

    def _tick(self) -> None:
        """Heartbeats, dead-peer detection, GOAWAY on shutdown, and closing
        the connection once a drain is complete."""
        # The ticker never waits for the write lock (send wait=False): a run
        # blocked writing to a sidecar that stopped reading holds it, and
        # only this thread can then see the sidecar fall silent and close.
        tick = max(0.005, min(POLL, self.heartbeat / 4))
        goaway_pending = False
        while not self._closed.wait(tick):
            now = time.monotonic()
            if self.agent.stopping and self._goaway_sent_at is None:
                log.info("shutting down: GOAWAY, waiting for %d run(s)", len(self.runs()))
                self._goaway_sent_at = now
                goaway_pending = True
            if goaway_pending:
                try:
                    goaway_pending = not self.send_json(
                        GOAWAY, 0, {"code": "shutdown", "message": "agent shutting down"}, wait=False)
                except (ConnectionLost, ValueError):
                    goaway_pending = False
            if self.draining() and not self.runs():
                log.info("drained: closing the connection")
                self.close()
                return
            if self._goaway_sent_at is not None and (
                    self.agent.forced or now - self._goaway_sent_at > self.agent.drain_timeout):
                # Runs left unfinished are failed as transient by the
                # sidecar when the connection drops, and retried.
                log.warning("closing with %d run(s) unfinished", len(self.runs()))
                self.close()
                return
            if now - self._last_recv > 3 * self.heartbeat:
                log.warning("sidecar silent for %.1f s: closing", now - self._last_recv)
                self._try_send_json(ERROR, 0, {"code": "heartbeat_timeout",
                                               "message": "no frame from the sidecar for 3 heartbeats"},
                                    wait=False)
                self.close()
                return
            if now - self._last_sent >= self.heartbeat:
                # Skipped while another thread writes: that write is traffic.
                try:
                    self.send(PING, 0, os.urandom(PING_SIZE), wait=False)
                except ConnectionLost:
                    return


# ---------------------------------------------------------------------------
# Process
# ---------------------------------------------------------------------------


class Agent:
    """Connects, serves a session, reconnects with backoff, until stopped.

    ``stopping`` and ``forced`` are plain attributes set by the signal
    handler (a signal handler must not take locks the interrupted main
    thread may hold), polled by the ticker and the backoff sleep.
    """

    def __init__(self, socket_path: str, max_runs: int, once: bool, drain_timeout: float) -> None:
        self.socket_path = socket_path
        self.max_runs = max(1, max_runs)
        self.once = once
        self.drain_timeout = drain_timeout
        self.stopping = False
        self.forced = False
        self._signals = 0

    def on_signal(self, signum: int, _frame: Any) -> None:
        """SIGTERM/SIGINT: start a graceful shutdown; a second one forces it."""
        self._signals += 1
        if self._signals == 1:
            self.stopping = True
        else:
            self.forced = True

    def run_completed(self) -> None:
        """Called after every run; with --once the first one ends the process."""
        if self.once:
            self.stopping = True

    def _sleep(self, seconds: float) -> None:
        """Sleep, returning early when stopping."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(POLL, max(0.0, deadline - time.monotonic())))

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        return sock

    def serve(self) -> int:
        """Serve until stopped; return the process exit status."""
        failures = 0
        while not self.stopping:
            try:
                sock = self._connect()
            except OSError as exc:
                failures += 1
                delay = backoff_delay(failures)
                log.info("connect %s: %s; retrying in %.2f s", self.socket_path, exc, delay)
                self._sleep(delay)
                continue
            session = Session(self, sock)
            started = time.monotonic()
            try:
                session.serve()
            except Unsupported as exc:
                log.error("sidecar refused protocol %d: %s", PROTOCOL_VERSION, exc)
                return 2
            if self.stopping:
                break
            if session.ran_any or time.monotonic() - started >= STABLE_SESSION:
                failures = 0
            failures += 1
            delay = backoff_delay(failures)
            log.info("reconnecting in %.2f s", delay)
            self._sleep(delay)
        log.info("stopped")
        return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Parse flags, install signal handlers, serve."""
    parser = argparse.ArgumentParser(description="Echo agent for mailbox-sidecar (docs/protocol.md).")
    parser.add_argument("--socket", default=os.environ.get("MAILBOX_AGENT_SOCKET", "./run/agent.sock"),
                        help="agent socket path (env MAILBOX_AGENT_SOCKET, default ./run/agent.sock)")
    parser.add_argument("--max-runs", type=int, default=2, help="runs executed at once (default 2)")
    parser.add_argument("--once", action="store_true", help="exit 0 after completing one run")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds to wait for runs on shutdown before dropping them (default 30)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.max_runs < 1:
        parser.error("--max-runs must be at least 1")

    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    agent = Agent(args.socket, args.max_runs, args.once, args.drain_timeout)
    signal.signal(signal.SIGTERM, agent.on_signal)
    signal.signal(signal.SIGINT, agent.on_signal)
    return agent.serve()


if __name__ == "__main__":
    sys.exit(main())
