"""MQTT transport shared by edges and the cloud (paho-mqtt 2.x, VERSION2 callbacks).

paho runs its network loop in its own thread. Nothing heavy happens there: every inbound
message is size-checked and handed to the owning asyncio loop with ``call_soon_threadsafe``;
handlers run on that loop and must only parse and enqueue. No exception may escape a paho
callback (paho's thread would die silently), so each callback is wrapped.

Credentials: the password is a `SecretStr` (its repr is masked) and is handed to paho only;
nothing here logs it, and broker URLs with user info (``mqtt://user:pass@host``) are refused so
that it cannot leak through a logged URL either. A refusal that retrying cannot cure (bad
credentials, a broker certificate our CA does not sign) ends `MqttTransport.connect` at once
with a `TransportError` that says so.

Reconnection is paho's own (``reconnect_delay_set`` gives the back-off); on every (re)connect
we re-make the subscriptions and run the registered on-connect hooks, which is how an edge
re-announces itself after a broker restart. On-disconnect hooks run when a live connection is
lost (not on `MqttTransport.close`): the cloud stops judging its edges' liveness while it is the
one that cannot hear them.

Sessions: a client with a stable identity (an explicit ``client_id`` and a last will: an edge, a
cloud replica) gets a persistent session by default (``clean_session`` False), so that the
broker keeps its subscriptions and queues its QoS 1 messages while it reconnects; tools, probes
and spies get a clean one (nothing is left on the broker when they exit). `session_present`
says whether the broker still had our session at the last connection: False after a broker
restart without persistence, when whatever was queued for us is gone.

Subscriptions are acknowledged: `MqttTransport.connect` returns once the broker has sent the
SUBACK for every registered subscription, and `MqttTransport.subscribe` on a live connection
waits for its own. A caller never has to guess (or sleep) until a subscription "has landed".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from pice_edge.errors import BrokerUnreachableError, ConfigError, TransportError
from pice_edge.protocol import DEFAULT_MAX_PAYLOAD_BYTES
from pice_edge.rejects import Rejections

log = logging.getLogger(__name__)

QOS = 1
#: How long `MqttTransport.subscribe` waits for the broker's SUBACK (seconds).
SUBACK_TIMEOUT_S = 10.0
_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class BrokerSettings(BaseModel):
    """Where and how to reach the MQTT broker."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(default="mqtt://127.0.0.1:1883", description="mqtt://host:port or mqtts://host:port")
    username: str | None = None
    password: SecretStr | None = None
    ca_file: str | None = Field(default=None, description="CA bundle to verify the broker (TLS)")
    cert_file: str | None = Field(default=None, description="client certificate (mutual TLS)")
    key_file: str | None = Field(default=None, description="client private key (mutual TLS)")
    keepalive_s: int = Field(default=15, ge=5, le=3600)
    reconnect_min_s: float = Field(default=0.5, gt=0, le=60)
    reconnect_max_s: float = Field(default=10.0, gt=0, le=600)
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD_BYTES, ge=1024, le=256 * 1024 * 1024)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parse_broker_url(value)
        if urlsplit(value).username is not None:
            raise ValueError("broker URL must not carry credentials; set username and password instead")
        return value

    @model_validator(mode="after")
    def _check_tls_pair(self) -> BrokerSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS needs both)")
        return self

    @property
    def host(self) -> str:
        return parse_broker_url(self.url)[1]

    @property
    def port(self) -> int:
        return parse_broker_url(self.url)[2]

    @property
    def tls(self) -> bool:
        return parse_broker_url(self.url)[0] == "mqtts" or self.ca_file is not None


def parse_broker_url(url: str) -> tuple[str, str, int]:
    """Split ``mqtt://host:port`` into (scheme, host, port); raise ValueError when malformed."""
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError(f"broker URL {url!r} must start with mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise ValueError(f"broker URL {url!r} has an invalid port") from exc
    return parts.scheme, parts.hostname, port


@dataclass(frozen=True)
class Message:
    """An inbound MQTT message, as handed to a handler on the asyncio loop."""

    topic: str
    payload: bytes
    retain: bool


Handler = Callable[[Message], None]


class MqttTransport:
    """One MQTT connection: QoS 1, last will, automatic reconnect, size-limited inbound payloads.

    Handlers are plain callables run on the asyncio loop that called `connect`; they must not
    block. Exceptions they raise are logged and counted, never propagated.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str | None = None,
        will: tuple[str, bytes] | None = None,
        rejections: Rejections | None = None,
        clean_session: bool | None = None,
    ) -> None:
        """``clean_session`` False keeps our subscriptions and QoS 1 messages on the broker while
        we are disconnected (with a stable ``client_id``): candidates an edge publishes while the
        cloud reconnects reach the cloud afterwards, and tasks the cloud sends while an edge
        reconnects reach the edge, instead of being dropped. ``None`` (the default): persistent
        for a client with an explicit ``client_id`` and a ``will`` (a device or a replica, whose
        identity outlives one connection), clean for any other (a tool or a probe must not leave
        a session on the broker that queues messages for it forever)."""
        self.settings = settings
        if clean_session is None:
            clean_session = client_id is None or will is None
        #: Whether the broker is asked to drop our session when we disconnect.
        self.clean_session = clean_session
        #: Whether the broker still had our session at the last (re)connection (its CONNACK's
        #: "session present"): False with a clean session, and after a broker restart without
        #: persistence (what it had queued for us is lost). None before the first connection.
        self.session_present: bool | None = None
        self.client_id = client_id or f"pice-{uuid.uuid4().hex[:12]}"
        self.rejections = rejections or Rejections()
        #: Topic filter -> its handlers, in the order added (one MQTT subscription per filter).
        self._subscriptions: dict[str, list[Handler]] = {}
        # SUBACK bookkeeping: message id -> waiter. The lock makes "send SUBSCRIBE, then record
        # its id" atomic with respect to paho's thread, which may receive the SUBACK in between.
        self._suback_lock = threading.Lock()
        self._suback_waiters: dict[int, Callable[[str | None], None]] = {}
        # Set when the SUBACK of the subscriptions re-made on the latest (re)connect arrived.
        self._resubscribed = threading.Event()
        self._connect_hooks: list[Callable[[], None]] = []
        self._disconnect_hooks: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = threading.Event()
        # Set when connect() can stop waiting: connected, or refused for a reason retrying won't fix.
        self._settled = threading.Event()
        self._refused = False
        self._closing = False
        self._last_error: str | None = None
        self.connect_count = 0

        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
        )
        if will is not None:
            client.will_set(will[0], will[1], qos=QOS, retain=True)
        if settings.username is not None:
            password = settings.password.get_secret_value() if settings.password else None
            client.username_pw_set(settings.username, password)
        if settings.tls:
            try:
                client.tls_set(
                    ca_certs=settings.ca_file,
                    certfile=settings.cert_file,
                    keyfile=settings.key_file,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise ConfigError(
                    f"cannot load the TLS files for broker {settings.url} (ca_file={settings.ca_file}, "
                    f"cert_file={settings.cert_file}, key_file={settings.key_file}): {exc}"
                ) from exc
        client.reconnect_delay_set(
            min_delay=max(1, round(settings.reconnect_min_s)), max_delay=max(1, round(settings.reconnect_max_s))
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._client = client

    # --- public API ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` on the asyncio loop after every successful (re)connection, once the
        broker has acknowledged the subscriptions."""
        self._connect_hooks.append(hook)

    def on_disconnect(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` on the asyncio loop when a live connection is lost (the broker went away,
        or the network between us); not when we close it ourselves. paho reconnects by itself,
        and the on-connect hooks run when it has."""
        self._disconnect_hooks.append(hook)

    def add_subscription(self, topic_filter: str, handler: Handler) -> None:
        """Deliver messages matching ``topic_filter`` to ``handler``; the subscription is made
        on every (re)connect, and `connect` waits for the broker to acknowledge it. On a live
        connection the SUBSCRIBE goes out now without waiting (use `subscribe` to wait).
        Handlers added for one filter all get its messages, over one subscription."""
        if self._add_handler(topic_filter, handler) and self.connected:
            self._client.subscribe(topic_filter, qos=QOS)

    def _add_handler(self, topic_filter: str, handler: Handler) -> bool:
        """Register ``handler``; True when ``topic_filter`` had none (the broker must be told)."""
        handlers = self._subscriptions.setdefault(topic_filter, [])
        if handler not in handlers:
            handlers.append(handler)
        return len(handlers) == 1

    async def subscribe(self, topic_filter: str, handler: Handler, *, timeout: float = SUBACK_TIMEOUT_S) -> None:
        """Like `add_subscription`, and on a live connection wait for the broker's SUBACK.

        Raises:
            TransportError: the broker refused the subscription (an ACL, say) or did not
                acknowledge it within ``timeout`` seconds.
        """
        if not self._add_handler(topic_filter, handler) or not self.connected:
            return  # already subscribed, or made (and waited for) by the next connect
        loop = asyncio.get_running_loop()
        acked: asyncio.Future[str | None] = loop.create_future()

        def settle(failure: str | None) -> None:
            if not acked.done():
                acked.set_result(failure)

        def done(failure: str | None) -> None:
            loop.call_soon_threadsafe(settle, failure)

        with self._suback_lock:
            rc, mid = self._client.subscribe(topic_filter, qos=QOS)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                raise TransportError(f"cannot subscribe to {topic_filter}: {mqtt.error_string(rc)}")
            self._suback_waiters[mid] = done
        try:
            failure = await asyncio.wait_for(acked, timeout)
        except asyncio.TimeoutError:
            raise TransportError(f"broker {self.settings.url} did not acknowledge the subscription to "
                                 f"{topic_filter} within {timeout:g}s") from None
        finally:
            with self._suback_lock:
                self._suback_waiters.pop(mid, None)
        if failure is not None:
            raise TransportError(f"broker {self.settings.url} refused the subscription to {topic_filter} "
                                 f"({failure}); check the broker's ACL for this client")

    def unsubscribe(self, topic_filter: str, handler: Handler | None = None) -> None:
        """Stop delivering ``topic_filter``'s messages to ``handler`` (None: to any); the broker
        subscription ends with the filter's last handler."""
        handlers = self._subscriptions.get(topic_filter)
        if handlers is None:
            return
        if handler is not None:
            with contextlib.suppress(ValueError):
                handlers.remove(handler)
        if handler is None or not handlers:
            del self._subscriptions[topic_filter]
            if self.connected:
                self._client.unsubscribe(topic_filter)

    async def connect(self, timeout: float = 10.0) -> None:
        """Connect and wait for the broker's CONNACK and the SUBACK of every registered subscription.

        Raises:
            TransportError: the broker could not be reached or refused the connection within
                ``timeout`` seconds. The message says which broker and why.
        """
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._refused = False
        self._settled.clear()
        try:
            self._client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive_s)
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot connect to MQTT broker {self.settings.url}: {exc}") from exc
        self._client.loop_start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await loop.run_in_executor(None, self._settled.wait, timeout)
        if self._connected.is_set():
            left = max(0.0, timeout - (loop.time() - started))
            if await loop.run_in_executor(None, self._resubscribed.wait, left):
                return
            await self.close()
            raise TransportError(f"MQTT broker {self.settings.url} did not acknowledge our subscriptions "
                                 f"within {timeout:.0f}s")
        self._client.loop_stop()
        reason = self._last_error or "no answer"
        if self._refused:
            raise TransportError(
                f"MQTT broker {self.settings.url} refused us ({reason}); check the username, password "
                "and TLS files (ca_file, cert_file, key_file)"
            )
        raise BrokerUnreachableError(
            f"cannot connect to MQTT broker {self.settings.url} within {timeout:.0f}s ({reason}); "
            "check that the broker runs and the URL, credentials and TLS files are right"
        )

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Queue a QoS 1 publish; paho sends it now or after the next reconnect."""
        if len(payload) > self.settings.max_payload_bytes:
            raise TransportError(
                f"refusing to publish {len(payload)} bytes on {topic}: over max_payload_bytes "
                f"({self.settings.max_payload_bytes})"
            )
        info = self._client.publish(topic, payload, qos=QOS, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish on {topic} failed: {mqtt.error_string(info.rc)}")

    async def publish_and_wait(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 5.0) -> bool:
        """Publish and wait for the broker's PUBACK; False when it did not come in time."""
        if len(payload) > self.settings.max_payload_bytes:
            raise TransportError(f"refusing to publish {len(payload)} bytes on {topic}: over max_payload_bytes")
        info = self._client.publish(topic, payload, qos=QOS, retain=retain)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, info.wait_for_publish, timeout)
        except (RuntimeError, ValueError):
            return False
        return bool(info.is_published())

    async def close(self) -> None:
        """Disconnect cleanly (no last will is sent) and stop paho's thread."""
        self._closing = True
        try:
            self._client.disconnect()
        except Exception:
            log.debug("disconnect failed", exc_info=True)
        await asyncio.get_running_loop().run_in_executor(None, self._client.loop_stop)
        self._connected.clear()

    # --- paho callbacks (network thread) ------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            if reason_code.is_failure:
                self._last_error = f"broker refused: {reason_code}"
                log.error("MQTT broker %s refused connection: %s", self.settings.url, reason_code)
                if str(reason_code) in ("Not authorized", "Bad user name or password"):
                    # Retrying with the same credentials cannot succeed.
                    client.disconnect()
                    self._refused = True
                    self._settled.set()
                return
            self.connect_count += 1
            self.session_present = bool(getattr(flags, "session_present", False))
            self._resubscribed.clear()
            filters = [(topic_filter, QOS) for topic_filter in self._subscriptions]
            if filters:
                with self._suback_lock:
                    rc, mid = client.subscribe(filters)
                    if rc == mqtt.MQTT_ERR_SUCCESS:
                        self._suback_waiters[mid] = self._resubscribed_ack
            else:
                self._subscribed()
            self._connected.set()
            self._settled.set()
            log.info("connected to MQTT broker %s as %s%s", self.settings.url, self.client_id,
                     "" if self.clean_session else
                     f" (persistent session: {'resumed' if self.session_present else 'new'})")
        except Exception:
            log.exception("error in MQTT on_connect")

    def _resubscribed_ack(self, failure: str | None) -> None:
        if failure is not None:
            log.error("MQTT broker %s refused a subscription (%s); check its ACL for client %s", self.settings.url,
                      failure, self.client_id)
        self._subscribed()

    def _subscribed(self) -> None:
        # The on-connect hooks run once our subscriptions are in place: an edge that announces
        # itself must already be able to receive the tasks its announcement attracts.
        self._resubscribed.set()
        if self._loop is not None and not self._loop.is_closed():
            for hook in self._connect_hooks:
                self._loop.call_soon_threadsafe(self._run_hook, hook)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        try:
            with self._suback_lock:
                waiter = self._suback_waiters.pop(mid, None)
            if waiter is None:
                return
            failed = [str(code) for code in reason_codes if getattr(code, "is_failure", False)]
            waiter(", ".join(failed) if failed else None)
        except Exception:
            log.exception("error in MQTT on_subscribe")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            was_connected = self._connected.is_set()
            self._connected.clear()
            if not self._closing and not self._refused:
                self._last_error = f"disconnected: {reason_code}"
                log.warning("lost MQTT broker %s (%s); reconnecting", self.settings.url, reason_code)
                loop = self._loop
                if was_connected and loop is not None and not loop.is_closed():
                    for hook in self._disconnect_hooks:
                        loop.call_soon_threadsafe(self._run_hook, hook)
        except Exception:
            log.exception("error in MQTT on_disconnect")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError` block: the exception is the current one.
        try:
            exc = sys.exc_info()[1]
            self._last_error = f"{type(exc).__name__}: {exc}" if exc is not None else "connection failed"
            log.debug("MQTT connection to %s failed: %s", self.settings.url, self._last_error)
            if isinstance(exc, ssl.SSLCertVerificationError):
                # The broker's certificate is not signed by our CA (or names another host):
                # the next try will fail the same way.
                self._refused = True
                self._settled.set()
        except Exception:
            log.exception("error in MQTT on_connect_fail")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            payload = bytes(msg.payload)
            if len(payload) > self.settings.max_payload_bytes:
                self.rejections.record(
                    "mqtt", "too_large",
                    f"{len(payload)} bytes on {msg.topic} (limit {self.settings.max_payload_bytes})",
                )
                return
            message = Message(topic=msg.topic, payload=payload, retain=bool(msg.retain))
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._dispatch, message)
        except Exception:
            log.exception("error in MQTT on_message")

    # --- asyncio loop side --------------------------------------------------------------

    def _dispatch(self, message: Message) -> None:
        for topic_filter, handlers in list(self._subscriptions.items()):
            if not mqtt.topic_matches_sub(topic_filter, message.topic):
                continue
            for handler in list(handlers):
                try:
                    handler(message)
                except Exception as exc:
                    self.rejections.record("handler", type(exc).__name__, f"{message.topic}: {exc!r}")
                    log.debug("handler for %s failed", topic_filter, exc_info=True)

    def _run_hook(self, hook: Callable[[], None]) -> None:
        try:
            hook()
        except Exception:
            log.exception("connection hook failed")
