// Connects with a short-lived token and reports what ends the connection: the server's
// `auth:expired`, then the disconnect and its reason.
//   VS_URL, VS_TOKEN
import { io } from "socket.io-client";

const say = (step, data = {}) => console.log(JSON.stringify({ step, at: Date.now(), ...data }));
setTimeout(() => { say("timeout"); process.exit(1); }, 20000);
const socket = io(process.env.VS_URL, { auth: { token: process.env.VS_TOKEN }, transports: ["websocket"], reconnection: false });
socket.on("connect_error", (err) => { say("connect_error", { message: err.message }); process.exit(1); });
socket.on("connect", () => say("connected"));
socket.on("auth:expired", (event) => say("expired", { event }));
socket.on("disconnect", (reason) => { say("disconnected", { reason }); process.exit(0); });
