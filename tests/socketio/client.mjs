// The official socket.io v4 client against a running vitalstream, driven by
// tests/socketio.rs. Prints one JSON line per step on stdout; exits 0 when every step passed.
//   VS_URL      http://127.0.0.1:PORT
//   VS_TOKEN    a clinician's JWT covering patient p1 only
import { io } from "socket.io-client";

const url = process.env.VS_URL;
const say = (step, data = {}) => console.log(JSON.stringify({ step, ...data }));
setTimeout(() => { say("timeout"); process.exit(1); }, 20000);

// A connection must be refused: resolves with the server's reason.
function refused(auth) {
  return new Promise((resolve) => {
    const s = io(url, { auth, transports: ["websocket"], reconnection: false });
    s.on("connect", () => { s.close(); resolve(null); });
    s.on("connect_error", (err) => { s.close(); resolve(err.message); });
  });
}

say("refused_bad_token", { message: await refused({ token: "not-a-jwt" }) });
say("refused_no_token", { message: await refused({}) });

const socket = io(url, { auth: { token: process.env.VS_TOKEN }, transports: ["websocket"], reconnection: false });
socket.on("connect_error", (err) => { say("connect_error", { message: err.message }); process.exit(1); });
socket.on("alert:updated", (event) => say("updated", { event }));
socket.on("alert:critical", async (event) => {
  say("critical", { event });
  const answer = await socket.timeout(5000).emitWithAck("alert:acknowledge", { alert_id: event.alert_id });
  say("acknowledged", { answer });
});
// Last: a notification sent to this user's room.
socket.on("notification:new", (notice) => {
  say("notification", { notice });
  socket.close();
  process.exit(0);
});
socket.on("connect", async () => {
  const other = await socket.timeout(5000).emitWithAck("subscribe:patient", { patient_id: "p2" });
  say("subscribe_p2", { answer: other });
  const own = await socket.timeout(5000).emitWithAck("subscribe:patient", { patient_id: "p1" });
  say("subscribe_p1", { answer: own });
  say("ready");
});
