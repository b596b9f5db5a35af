// A TCP proxy between a client and a node, to cut the network on demand.
import { createServer, connect, type Server, type Socket } from "node:net";

export class Proxy {
  port = 0;
  /** Refuse (close at once) new connections and do not forward. */
  private down = false;
  /** Forward client -> server but throw away server -> client bytes. */
  dropReplies = false;
  private server: Server;
  private pairs = new Set<[Socket, Socket]>();

  private constructor(private targetPort: () => number) {
    this.server = createServer((c) => this.accept(c));
  }

  static async start(targetPort: () => number): Promise<Proxy> {
    const p = new Proxy(targetPort);
    await new Promise<void>((res) => p.server.listen(0, "127.0.0.1", res));
    p.port = (p.server.address() as { port: number }).port;
    return p;
  }

  get url(): string {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  private accept(c: Socket): void {
    if (this.down) {
      c.destroy();
      return;
    }
    const s = connect(this.targetPort(), "127.0.0.1");
    const pair: [Socket, Socket] = [c, s];
    this.pairs.add(pair);
    c.on("data", (d) => s.write(d));
    s.on("data", (d) => {
      if (!this.dropReplies) c.write(d);
    });
    const end = () => {
      this.pairs.delete(pair);
      c.destroy();
      s.destroy();
    };
    c.on("close", end).on("error", end);
    s.on("close", end).on("error", end);
  }

  /** Cuts every connection (like a network drop: no close frame) and refuses new ones. */
  cut(): void {
    this.down = true;
    for (const [c, s] of this.pairs) {
      c.destroy();
      s.destroy();
    }
    this.pairs.clear();
  }

  restore(): void {
    this.down = false;
    this.dropReplies = false;
  }

  get connections(): number {
    return this.pairs.size;
  }

  close(): Promise<void> {
    this.cut();
    return new Promise((res) => this.server.close(() => res()));
  }
}
