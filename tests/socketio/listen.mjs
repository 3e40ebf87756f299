// Connects, joins one patient's room, and waits for one event there (VS_EVENT, by default
// alert:critical).
//   VS_URL, VS_TOKEN, VS_PATIENT, VS_EVENT
import { io } from "socket.io-client";

const say = (step, data = {}) => console.log(JSON.stringify({ step, ...data }));
setTimeout(() => { say("timeout"); process.exit(1); }, 20000);
const socket = io(process.env.VS_URL, { auth: { token: process.env.VS_TOKEN }, transports: ["websocket"], reconnection: false });
socket.on("connect_error", (err) => { say("connect_error", { message: err.message }); process.exit(1); });
const wanted = process.env.VS_EVENT || "alert:critical";
socket.on(wanted, (event) => { say(wanted === "alert:critical" ? "critical" : "event", { event }); socket.close(); process.exit(0); });
socket.on("connect", async () => {
  const answer = await socket.timeout(5000).emitWithAck("subscribe:patient", { patient_id: process.env.VS_PATIENT });
  say("subscribed", { answer });
  say("ready");
});
