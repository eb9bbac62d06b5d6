/**
 * A long operation (create, restore, upload): a promise of its result that is also an async iterator of
 * its progress.
 *
 *   const backup = await client.create({ onProgress: (p) => log(p.phase) });   // callback
 *   const op = client.create();
 *   for await (const p of op) log(p.phase, p.bytesDone);                       // iterator
 *   const backup = await op;                                                   // then the result
 *
 * The call starts at once, whether or not anyone iterates. An iterator sees the latest event from before
 * it was made, then every later one, and ends when the operation ends (throwing its error if it failed).
 * Breaking out of the loop does not cancel the operation; its AbortSignal does.
 */
import type { ProgressEvent } from "./types";

type Waiter = { resolve: (result: IteratorResult<ProgressEvent>) => void; reject: (error: unknown) => void };

class Subscriber implements AsyncIterator<ProgressEvent> {
  readonly queue: ProgressEvent[] = [];
  waiter: Waiter | undefined;
  closed = false;

  constructor(
    private readonly operation: { state(): { done: boolean; error: unknown } },
    private readonly detach: (subscriber: Subscriber) => void,
  ) {}

  push(event: ProgressEvent): void {
    if (this.waiter !== undefined) {
      const { resolve } = this.waiter;
      this.waiter = undefined;
      resolve({ value: event, done: false });
    } else {
      this.queue.push(event);
    }
  }

  /** The operation ended: wake a waiting `next()`. */
  settle(): void {
    if (this.waiter !== undefined && this.queue.length === 0) {
      const waiter = this.waiter;
      this.waiter = undefined;
      this.finish(waiter);
    }
  }

  private finish(waiter: Waiter): void {
    const { error } = this.operation.state();
    this.closed = true;
    this.detach(this);
    if (error !== undefined) {
      waiter.reject(error);
    } else {
      waiter.resolve({ value: undefined, done: true });
    }
  }

  next(): Promise<IteratorResult<ProgressEvent>> {
    const event = this.queue.shift();
    if (event !== undefined) {
      return Promise.resolve({ value: event, done: false });
    }
    if (this.closed) {
      return Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject };
      if (this.operation.state().done) {
        this.finish(waiter);
      } else {
        this.waiter = waiter;
      }
    });
  }

  return(): Promise<IteratorResult<ProgressEvent>> {
    this.closed = true;
    this.queue.length = 0;
    this.detach(this);
    return Promise.resolve({ value: undefined, done: true });
  }
}

export class Operation<T> implements PromiseLike<T>, AsyncIterable<ProgressEvent> {
  /** The operation's outcome. Awaiting the operation itself is the same. */
  readonly result: Promise<T>;
  readonly #subscribers = new Set<Subscriber>();
  #latest: ProgressEvent | undefined;
  #done = false;
  #error: unknown = undefined;

  /**
   * Runs `run`, which reports progress through `emit`. `onProgress` sees every event; when it throws, the
   * operation is cancelled through `cancel` and rejects with that error.
   */
  constructor(
    run: (emit: (event: ProgressEvent) => void) => Promise<T>,
    onProgress: ((event: ProgressEvent) => void) | undefined,
    cancel: (reason: unknown) => void,
  ) {
    let callbackError: { error: unknown } | undefined;
    const emit = (event: ProgressEvent): void => {
      this.#latest = event;
      for (const subscriber of this.#subscribers) {
        subscriber.push(event);
      }
      if (onProgress !== undefined && callbackError === undefined) {
        try {
          onProgress(event);
        } catch (error) {
          callbackError = { error };
          cancel(error);
        }
      }
    };
    this.result = (async () => {
      try {
        return await run(emit);
      } catch (error) {
        throw callbackError === undefined ? error : callbackError.error;
      }
    })();
    this.result.then(
      () => this.#settle(undefined),
      (error: unknown) => this.#settle(error ?? new Error("the operation failed")),
    );
  }

  #settle(error: unknown): void {
    this.#done = true;
    this.#error = error;
    for (const subscriber of this.#subscribers) {
      subscriber.settle();
    }
  }

  /** The latest progress event, if any has arrived. */
  get latest(): ProgressEvent | undefined {
    return this.#latest;
  }

  [Symbol.asyncIterator](): AsyncIterator<ProgressEvent> {
    const subscriber = new Subscriber(
      { state: () => ({ done: this.#done, error: this.#error }) },
      (s) => this.#subscribers.delete(s),
    );
    if (this.#latest !== undefined) {
      subscriber.queue.push(this.#latest);
    }
    if (!this.#done) {
      this.#subscribers.add(subscriber);
    }
    return subscriber;
  }

  then<R1 = T, R2 = never>(
    onfulfilled?: ((value: T) => R1 | PromiseLike<R1>) | null,
    onrejected?: ((reason: unknown) => R2 | PromiseLike<R2>) | null,
  ): Promise<R1 | R2> {
    return this.result.then(onfulfilled, onrejected);
  }

  catch<R = never>(onrejected?: ((reason: unknown) => R | PromiseLike<R>) | null): Promise<T | R> {
    return this.result.catch(onrejected);
  }

  finally(onfinally?: (() => void) | null): Promise<T> {
    return this.result.finally(onfinally);
  }

  get [Symbol.toStringTag](): string {
    return "Operation";
  }
}
