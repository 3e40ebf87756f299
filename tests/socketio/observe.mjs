// The load harness's observer: connects with the official client as a clinician (so in
// role:clinician, which carries every patient's alerts) and prints each alert:critical as
// one JSON line with the time it arrived (µs since the epoch).
//   VS_URL, VS_TOKEN
import { io } from "socket.io-client";

const now_us = () => Math.round((performance.timeOrigin + performance.now()) * 1000);
const say = (line) => console.log(JSON.stringify(line));
const socket = io(process.env.VS_URL, { auth: { token: process.env.VS_TOKEN }, transports: ["websocket"] });
socket.on("connect_error", (err) => say({ step: "connect_error", message: err.message }));
socket.on("connect", () => say({ step: "ready" }));
socket.on("alert:critical", (alert) => say({ step: "alert", at_us: now_us(), alert }));
process.stdin.on("end", () => { socket.close(); process.exit(0); });
process.stdin.resume();
