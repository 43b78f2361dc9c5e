/** AbortSignal plumbing shared by Client and Session. */
import { setMaxListeners } from "node:events";

/**
 * An AbortController aborted (with the same reason) as soon as any of `signals` is, and
 * `unlink()` to stop listening to them once the work it guards is over: the client's close
 * signal lives as long as the client, and must not collect a listener per call.
 */
export function linkedAbort(...signals: (AbortSignal | undefined)[]): {
  controller: AbortController;
  unlink: () => void;
} {
  const controller = new AbortController();
  const sources = signals.filter((s): s is AbortSignal => s !== undefined);
  const onAbort = function (this: AbortSignal): void {
    unlink();
    controller.abort(this.reason);
  };
  const unlink = (): void => {
    for (const source of sources) {
      source.removeEventListener("abort", onAbort);
    }
  };
  for (const source of sources) {
    if (source.aborted) {
      controller.abort(source.reason);
      return { controller, unlink: () => undefined };
    }
  }
  for (const source of sources) {
    source.addEventListener("abort", onAbort, { once: true });
  }
  return { controller, unlink };
}

/** An AbortController whose signal takes any number of listeners without a warning. */
export function sharedAbortController(): AbortController {
  const controller = new AbortController();
  setMaxListeners(0, controller.signal);
  return controller;
}
