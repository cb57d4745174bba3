// The Node reference for `userstreamd bench fanout --compare` (see reference.py):
//   node reference_ws.js POOL RATE
// Node's ws broadcasting user frames as userstreamd sends them, RATE per second on a 1 ms
// tick, to every client. Prints "listening PORT"; reads "rate R" lines on stdin; exits
// at the end of stdin.
"use strict";
const fs = require("fs");
const { WebSocketServer, WebSocket } = require("ws");

const pool = fs.readFileSync(process.argv[2], "utf8").split("\n").filter(Boolean);
let rate = Number(process.argv[3]);
let seq = 0;
let sent = 0;
let start = performance.now();

function producedAt() {
  // Wall clock to the microsecond: Date has milliseconds only.
  const ms = performance.timeOrigin + performance.now();
  const whole = Math.floor(ms);
  const micros = String(Math.floor((ms - whole) * 1000)).padStart(3, "0");
  return new Date(whole).toISOString().slice(0, -1) + micros + "Z";
}

const server = new WebSocketServer({ host: "127.0.0.1", port: 0, perMessageDeflate: false });
server.on("listening", () => process.stdout.write(`listening ${server.address().port}\n`));
server.on("connection", (socket) => socket.on("error", () => {}));

function tick() {
  const due = Math.floor(((performance.now() - start) * rate) / 1000);
  while (sent < due) {
    seq += 1;
    sent += 1;
    const frame =
      `{"type":"user","epoch":"reference","seq":${seq},"position":${seq},` +
      `"produced_at":"${producedAt()}","source":"synthetic","user":${pool[seq % pool.length]}}`;
    for (const client of server.clients) {
      if (client.readyState === WebSocket.OPEN) client.send(frame);
    }
  }
  setTimeout(tick, 1);
}
setTimeout(tick, 1);

let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => {
  input += chunk;
  let end;
  while ((end = input.indexOf("\n")) >= 0) {
    const words = input.slice(0, end).trim().split(/\s+/);
    input = input.slice(end + 1);
    if (words[0] === "rate") {
      rate = Number(words[1]);
      sent = 0;
      start = performance.now();
    }
  }
});
process.stdin.on("end", () => process.exit(0));
