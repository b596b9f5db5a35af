export function findChorus(): string;
export function buildApp(): Promise<void>;
export function startNode(opts?: { chorus?: string; config?: string }): Promise<{ url: string; http: string; config: string; stop(): Promise<void> }>;
export function startDemoServer(opts?: { port?: number; nodeUrl?: string; chorus?: string; config?: string }): Promise<{ port: number; close(): Promise<void> }>;
