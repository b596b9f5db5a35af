/** A small typed event emitter (browser and Node, no dependency). */
export class Emitter<Events extends { [K in keyof Events]: (...args: any[]) => void }> {
  private handlers = new Map<keyof Events, Set<Function>>();

  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof Events>(event: K, fn: Events[K]): () => void {
    let set = this.handlers.get(event);
    if (!set) this.handlers.set(event, (set = new Set()));
    set.add(fn);
    return () => this.off(event, fn);
  }

  once<K extends keyof Events>(event: K, fn: Events[K]): () => void {
    const off = this.on(event, ((...args: any[]) => {
      off();
      (fn as Function)(...args);
    }) as Events[K]);
    return off;
  }

  off<K extends keyof Events>(event: K, fn: Events[K]): void {
    this.handlers.get(event)?.delete(fn);
  }

  protected emit<K extends keyof Events>(event: K, ...args: Parameters<Events[K]>): void {
    const set = this.handlers.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(...args);
      } catch (e) {
        // A listener's bug must not break the connection's bookkeeping.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  protected listenerCount(event: keyof Events): number {
    return this.handlers.get(event)?.size ?? 0;
  }
}
