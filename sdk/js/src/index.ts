export { ChorusClient, Subscription, newClientId } from "./client.js";
export type {
  ChorusClientOptions,
  ClientEvents,
  ConnectionState,
  DisconnectInfo,
  QueueOptions,
  ReconnectOptions,
  RequestOptions,
  SubscribeOptions,
  SubscriptionEvents,
  UnrecoveredInfo,
  WebSocketConstructor,
  WebSocketLike,
} from "./client.js";
export { Messages, Notifications, PresenceApi, Rooms, Topics } from "./api.js";
export type { HistoryOptions, SendOptions } from "./api.js";
export { ChorusError, ClientErrorCode, ErrorCode, isChorusError } from "./errors.js";
export type { ErrorBody, ErrorName } from "./errors.js";
export { SUBPROTOCOL } from "./codec.js";
export type { Encoding } from "./codec.js";
export type * from "./types.js";
