#!/usr/bin/env node
// Independent E2EE checker: a matrix-js-sdk client with Rust crypto (what Element runs)
// that waits for one message in a room and reports the shield Element would show on it.
//
//   node checker.mjs --homeserver URL --user @x:localhost --password P --room '!id'
//       [--expect-body TEXT] [--expect-sender @ghost:localhost] [--reply TEXT]
//       [--timeout 60] [--quiet]
//
// SDK logging goes to stderr (--quiet keeps only its warnings and errors).
//
// stdout carries only JSON lines, one object each:
//   {"event":"ready", ...}     joined, own device keys on the server: send now
//   {"event":"message", "body", "sender", "sender_device", "shield_colour",
//    "shield_reason", "decrypted": true, ...}
//   {"event":"replied", "event_id"}                       (with --reply)
//   {"event":"timeout", "stage", ...}                      then exit 1
// Everything else (SDK logging, errors) goes to stderr. Exit 0 ok, 1 timeout, 2 error.

import { parseArgs } from "node:util";

// --- stdout is ours; everything the SDK prints goes to stderr --------------------------
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const toStderr = console.error.bind(console);
const quiet = process.argv.includes("--quiet");
// The SDK's logger looks the console methods up on every call, so this catches it all.
console.log = quiet ? () => {} : toStderr;
console.info = quiet ? () => {} : toStderr;
console.debug = quiet ? () => {} : toStderr;
console.trace = quiet ? () => {} : toStderr;
console.warn = toStderr;

// --- arguments ---------------------------------------------------------------------------
const { values: opts } = parseArgs({
    options: {
        homeserver: { type: "string" },
        user: { type: "string" },
        password: { type: "string" },
        room: { type: "string" },
        "expect-body": { type: "string" },
        "expect-sender": { type: "string" },
        reply: { type: "string" },
        timeout: { type: "string", default: "60" },
        quiet: { type: "boolean", default: false },
    },
    strict: true,
});
for (const required of ["homeserver", "user", "password", "room"]) {
    if (!opts[required]) {
        console.error(`checker: --${required} is required`);
        process.exit(2);
    }
}
const timeoutMs = Number(opts.timeout) * 1000;
if (!(timeoutMs > 0)) {
    console.error("checker: --timeout must be a positive number of seconds");
    process.exit(2);
}
const roomId = opts.room;

// --- Node 20: the SDK uses Promise.withResolvers (Node 22+); polyfill before loading it ---
if (typeof Promise.withResolvers !== "function") {
    Promise.withResolvers = function withResolvers() {
        let resolve;
        let reject;
        const promise = new this((res, rej) => {
            resolve = res;
            reject = rej;
        });
        return { promise, resolve, reject };
    };
}

// The crypto-wasm package's node entry (node.mjs) reads the .wasm from disk; the browser
// entry would fetch() it. Resolve it the way the SDK does so both share one module.
const wasmUrl = import.meta.resolve("@matrix-org/matrix-sdk-crypto-wasm");
if (!wasmUrl.endsWith("/node.mjs")) {
    console.error(`checker: crypto-wasm resolved to ${wasmUrl}, expected its node.mjs entry`);
    process.exit(2);
}
const cryptoWasm = await import(wasmUrl);
await cryptoWasm.initAsync();

const sdk = await import("matrix-js-sdk");
const { EventShieldColour, EventShieldReason } = await import("matrix-js-sdk/lib/crypto-api/index.js");
const { ClientEvent, KnownMembership, MatrixEventEvent, RoomEvent, SyncState } = sdk;

const enumName = (enumObj, value) =>
    value === null || value === undefined
        ? null
        : (Object.keys(enumObj).find((k) => enumObj[k] === value) ?? String(value));

// --- the run -------------------------------------------------------------------------------
let stage = "login";
const diagnostics = { undecryptable: [], seen_messages: 0 };
let client;

const timer = setTimeout(async () => {
    emit({ event: "timeout", stage, ...diagnostics });
    await shutdown(1);
}, timeoutMs);

async function shutdown(code) {
    clearTimeout(timer);
    try {
        client?.stopClient();
    } catch {
        // exiting anyway
    }
    process.exit(code);
}

function waitFor(predicate, subscribe) {
    // Resolve once predicate() is true; re-check whenever subscribe's callback fires.
    return new Promise((resolve) => {
        if (predicate()) return resolve();
        const unsubscribe = subscribe(() => {
            if (predicate()) {
                unsubscribe();
                resolve();
            }
        });
    });
}

async function ownDeviceKeysOnServer() {
    const answer = await client.http.authedRequest(sdk.Method.Post, "/keys/query", undefined, {
        device_keys: { [client.getUserId()]: [client.getDeviceId()] },
    });
    return Boolean(answer?.device_keys?.[client.getUserId()]?.[client.getDeviceId()]);
}

async function senderDevice(event) {
    // Megolm events name the session's Curve25519 key; map it back to a device id.
    const senderKey = event.getSenderKey();
    const devices = await client.getCrypto().getUserDeviceInfo([event.getSender()], true);
    for (const device of devices.get(event.getSender())?.values() ?? []) {
        if (senderKey && device.getIdentityKey() === senderKey) return device.deviceId;
    }
    return event.getWireContent()?.device_id ?? null;
}

async function main() {
    const loginClient = sdk.createClient({ baseUrl: opts.homeserver });
    const login = await loginClient.loginRequest({
        type: "m.login.password",
        identifier: { type: "m.id.user", user: opts.user },
        password: opts.password,
        initial_device_display_name: "civic-bridge e2ee checker",
    });
    client = sdk.createClient({
        baseUrl: opts.homeserver,
        userId: login.user_id,
        deviceId: login.device_id,
        accessToken: login.access_token,
    });
    // In-memory crypto store: each run is a new device, no IndexedDB needed in Node.
    await client.initRustCrypto({ useIndexedDB: false });

    stage = "sync";
    const prepared = waitFor(
        () => client.isInitialSyncComplete(),
        (cb) => {
            const h = (state) => (state === SyncState.Prepared || state === SyncState.Syncing) && cb();
            client.on(ClientEvent.Sync, h);
            return () => client.off(ClientEvent.Sync, h);
        },
    );
    await client.startClient({ initialSyncLimit: 20 });
    await prepared;

    // Messages are collected from here on, so none can slip by while we get ready.
    const handled = new Set();
    let ready = false;
    const beforeReady = new Set(); // without --expect-body only messages after ready count
    let resolveMessage;
    const messageArrived = new Promise((resolve) => (resolveMessage = resolve));
    const consider = (event) => {
        if (event.getRoomId() !== roomId || handled.has(event.getId())) return;
        if (!ready) beforeReady.add(event.getId());
        if (event.isBeingDecrypted()) return; // Decrypted fires when done
        if (event.isDecryptionFailure()) {
            if (!diagnostics.undecryptable.some((u) => u.event_id === event.getId())) {
                diagnostics.undecryptable.push({
                    event_id: event.getId(),
                    sender: event.getSender(),
                    reason: event.decryptionFailureReason,
                });
            }
            return; // a late room key re-fires Decrypted
        }
        if (event.getType() !== "m.room.message") return;
        const sender = event.getSender();
        if (opts["expect-sender"] ? sender !== opts["expect-sender"] : sender === client.getUserId())
            return;
        diagnostics.seen_messages += 1;
        const body = event.getContent()?.body;
        if (opts["expect-body"] !== undefined) {
            if (body !== opts["expect-body"]) return;
        } else if (beforeReady.has(event.getId())) {
            return;
        }
        handled.add(event.getId());
        resolveMessage(event);
    };
    client.on(RoomEvent.Timeline, (event) => consider(event));
    client.on(MatrixEventEvent.Decrypted, (event) => consider(event));

    // Join (accepting an invite, or waiting for one) and see the join come back in sync.
    stage = "join";
    const membership = () => client.getRoom(roomId)?.getMyMembership();
    const onMembershipChange = (cb) => {
        const h = () => cb();
        client.on(RoomEvent.MyMembership, h);
        client.on(ClientEvent.Room, h);
        return () => {
            client.off(RoomEvent.MyMembership, h);
            client.off(ClientEvent.Room, h);
        };
    };
    if (membership() !== KnownMembership.Join) {
        try {
            await client.joinRoom(roomId);
        } catch (err) {
            // Not invited yet: wait for the invite, then join.
            console.error("checker: join failed, waiting for an invite:", err?.errcode ?? err);
            await waitFor(() => membership() === KnownMembership.Invite, onMembershipChange);
            await client.joinRoom(roomId);
        }
    }
    await waitFor(() => membership() === KnownMembership.Join, onMembershipChange);

    stage = "device_keys";
    while (!(await ownDeviceKeysOnServer())) {
        await new Promise((r) => setTimeout(r, 200));
    }
    for (const event of client.getRoom(roomId)?.getLiveTimeline().getEvents() ?? []) {
        consider(event); // an expected message may have come before we were ready
    }
    ready = true;
    stage = "message";
    emit({ event: "ready", user_id: client.getUserId(), device_id: client.getDeviceId() });

    const event = await messageArrived;
    const info = await client.getCrypto().getEncryptionInfoForEvent(event);
    emit({
        event: "message",
        event_id: event.getId(),
        body: event.getContent()?.body ?? null,
        sender: event.getSender(),
        sender_device: await senderDevice(event),
        shield_colour: info ? enumName(EventShieldColour, info.shieldColour) : null,
        shield_reason: info ? enumName(EventShieldReason, info.shieldReason) : null,
        decrypted: event.isEncrypted() && !event.isDecryptionFailure(),
    });

    if (opts.reply !== undefined) {
        stage = "reply";
        const sent = await client.sendMessage(roomId, {
            msgtype: "m.text",
            body: opts.reply,
            "m.relates_to": { "m.in_reply_to": { event_id: event.getId() } },
        });
        emit({ event: "replied", event_id: sent.event_id });
    }
    await shutdown(0);
}

main().catch(async (err) => {
    console.error("checker: failed in stage", stage, err);
    clearTimeout(timer);
    try {
        client?.stopClient();
    } catch {
        // exiting anyway
    }
    process.exit(2);
});
